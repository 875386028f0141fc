//! Fuzzes the YAML front end and the model conversion: `parse_workflow` must return `Ok` or
//! `Err` for every input, never panic, hang or exhaust memory (aliases are budgeted).
//!
//! Run (stable toolchain, no sanitizer), seeding from the shared corpus without writing into it:
//! `cargo fuzz run -s none parse_workflow /tmp/fuzz-corpus ../../../shared/corpus/workflows`
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(wf) = kiln_workflow::parse_workflow("fuzz.yml", text)
    {
        // A loaded workflow always plans and its literal matrices expand or fail cleanly.
        kiln_workflow::job_order(&wf).expect("a loaded workflow has a job order");
        for job in wf.jobs.values() {
            if let Some(def) = job.strategy.as_ref().and_then(|s| s.matrix.as_ref()) {
                let _ = kiln_workflow::expand_matrix(def);
            }
        }
    }
});
