//! Finding and loading workflow files; `kiln list` and `kiln validate`.

use std::path::{Path, PathBuf};

use anyhow::anyhow;
use kiln_workflow::Workflow;

use crate::args::{ListArgs, ValidateArgs};
use crate::{Exit, exit, usage};

/// The workflow files PATH names: the file itself, or a directory's
/// `.github/workflows/*.yml|yaml` (or the directory's own `*.yml|yaml` when it has no
/// `.github`), sorted.
pub fn discover(path: &Path) -> Result<Vec<PathBuf>, Exit> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        return Err(usage(anyhow!(
            "{}: no such file or directory",
            path.display()
        )));
    }
    let nested = path.join(".github/workflows");
    let dir = if nested.is_dir() {
        nested
    } else {
        path.to_path_buf()
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map_err(|e| usage(anyhow!("Cannot read {}: {e}", dir.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension()
                    .is_some_and(|ext| ext == "yml" || ext == "yaml")
        })
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(usage(anyhow!(
            "{}: no workflow files (*.yml, *.yaml) found",
            dir.display()
        )));
    }
    Ok(files)
}

/// A path as the user should see it: relative to the current directory when below it.
pub fn display_path(path: &Path) -> String {
    std::env::current_dir()
        .ok()
        .and_then(|cwd| path.strip_prefix(&cwd).ok().map(Path::to_path_buf))
        .unwrap_or_else(|| path.to_path_buf())
        .display()
        .to_string()
}

/// Reads and parses one workflow. Errors are user errors (exit 2) naming `file:line:col`.
pub fn load(path: &Path) -> Result<Workflow, Exit> {
    let shown = display_path(path);
    let bytes = std::fs::read(path).map_err(|e| usage(anyhow!("Cannot read {shown}: {e}")))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        usage(anyhow!(
            "{shown}: not valid UTF-8 (byte {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    let workflow = kiln_workflow::parse_workflow(&shown, &text)
        .map_err(|e| Exit::new(exit::USAGE, anyhow!("{e}")))?;
    for warning in &workflow.warnings {
        eprintln!("warning: {}: {}", warning.span, warning.message);
    }
    Ok(workflow)
}

/// `kiln list`.
pub fn list(args: &ListArgs) -> Result<u8, Exit> {
    let mut rows = Vec::new();
    let single = args.path.is_file();
    for path in discover(&args.path)? {
        let workflow = load(&path)?;
        if !single && !workflow.on.has_event(&args.event) {
            continue;
        }
        let levels = kiln_workflow::job_order(&workflow).map_err(|e| usage(anyhow!("{e}")))?;
        for (stage, level) in levels.iter().enumerate() {
            for job_id in level {
                let name = workflow
                    .jobs
                    .get(job_id)
                    .and_then(|j| j.name.as_ref())
                    .map_or_else(|| job_id.clone(), |n| n.source().to_owned());
                let events: Vec<&str> = workflow.on.events.keys().map(String::as_str).collect();
                rows.push([
                    stage.to_string(),
                    job_id.clone(),
                    name,
                    workflow.display_name().to_owned(),
                    display_path(&path),
                    events.join(","),
                ]);
            }
        }
    }
    if rows.is_empty() {
        eprintln!(
            "No workflow in {} runs on `{}`.",
            args.path.display(),
            args.event
        );
        return Ok(exit::SUCCESS);
    }
    let header = [
        "Stage",
        "Job ID",
        "Job name",
        "Workflow name",
        "Workflow file",
        "Events",
    ];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let print = |cells: [&str; 6]| {
        let line: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    };
    print(header);
    for row in &rows {
        print([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
    Ok(exit::SUCCESS)
}

/// `kiln validate`.
pub fn validate(args: &ValidateArgs) -> Result<u8, Exit> {
    let paths = if args.paths.is_empty() {
        vec![PathBuf::from(".")]
    } else {
        args.paths.clone()
    };
    let mut failed = 0usize;
    let mut checked = 0usize;
    for path in &paths {
        for file in discover(path)? {
            checked += 1;
            match load(&file) {
                Ok(workflow) => match kiln_workflow::job_order(&workflow) {
                    Ok(_) => eprintln!("ok      {}", display_path(&file)),
                    Err(e) => {
                        failed += 1;
                        eprintln!("{e}");
                    }
                },
                Err(Exit { error, .. }) => {
                    failed += 1;
                    eprintln!("{error}");
                }
            }
        }
    }
    eprintln!("{checked} checked, {failed} invalid");
    Ok(if failed == 0 {
        exit::SUCCESS
    } else {
        exit::USAGE
    })
}
