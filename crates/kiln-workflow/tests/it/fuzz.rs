//! `parse_workflow` never panics, whatever the input: random bytes, and corpus files with
//! random edits (deleted, duplicated and swapped lines, spliced characters).

use proptest::prelude::*;

use kiln_workflow::parse_workflow;

use crate::corpus::corpus_files;

/// Cases per property: `KILN_FUZZ_CASES` for long runs, else `default`.
fn cases(default: u32) -> u32 {
    std::env::var("KILN_FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

fn corpus_texts() -> Vec<String> {
    corpus_files()
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .collect()
}

/// Applies an edit to `text`, on char boundaries.
fn mutate(text: &str, edit: u8, at: usize, len: usize, insert: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return insert.to_owned();
    }
    let i = at % lines.len();
    let j = (at / 7 + len) % lines.len();
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    match edit % 5 {
        0 => {
            out.remove(i);
        }
        1 => out.insert(i, lines[j].to_owned()),
        2 => out.swap(i, j),
        3 => {
            let line = &out[i];
            let cut = line
                .char_indices()
                .map(|(k, _)| k)
                .nth(len % (line.chars().count() + 1))
                .unwrap_or(line.len());
            out[i] = format!("{}{insert}{}", &line[..cut], &line[cut..]);
        }
        _ => {
            let indent = " ".repeat(len % 9);
            out.insert(i, format!("{indent}{insert}"));
        }
    }
    out.join("\n")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(2000), ..ProptestConfig::default() })]

    #[test]
    fn random_text_never_panics(text in "\\PC{0,200}") {
        let _ = parse_workflow("fuzz.yml", &text);
    }

    #[test]
    fn yamlish_text_never_panics(text in "([a-z-]{1,8}: ?|- |  |\\$\\{\\{ |\\}\\}|[\\[\\]{}&*!|>'\",#:]|\n){0,60}") {
        let _ = parse_workflow("fuzz.yml", &text);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(3000), ..ProptestConfig::default() })]

    #[test]
    fn mutated_corpus_never_panics(
        file in any::<prop::sample::Index>(),
        edits in prop::collection::vec((any::<u8>(), any::<usize>(), 0usize..200, "[ -~]{0,12}|\\$\\{\\{|\\}\\}|: |- |\\*a|&a"), 1..4),
    ) {
        thread_local! { static TEXTS: Vec<String> = corpus_texts(); }
        TEXTS.with(|texts| {
            let mut text = file.get(texts).clone();
            for (edit, at, len, insert) in &edits {
                text = mutate(&text, *edit, *at, *len, insert);
            }
            let _ = parse_workflow("fuzz.yml", &text);
        });
    }
}
