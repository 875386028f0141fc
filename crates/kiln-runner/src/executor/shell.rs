//! `shell:` to the command GitHub's runner runs, with its exact default invocations.

use kiln_vm::Command;

/// The command for a `run:` script under `shell` (`None`: the default, `bash -e {0}`).
pub fn command(shell: Option<&str>, script: String) -> Result<Command, String> {
    let (argv, extension): (Vec<&str>, &str) = match shell.map(str::trim) {
        // GitHub's default on Linux when no shell is given (bash found on the runner).
        None => (vec!["bash", "-e", "{0}"], ".sh"),
        Some("bash") => (
            vec!["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"],
            ".sh",
        ),
        Some("sh") => (vec!["sh", "-e", "{0}"], ".sh"),
        Some("python") => (vec!["python", "{0}"], ".py"),
        Some("pwsh") => (vec!["pwsh", "-command", ". '{0}'"], ".ps1"),
        Some(windows @ ("cmd" | "powershell")) => {
            return Err(format!(
                "`shell: {windows}` needs a Windows runner; kiln runs Linux guests"
            ));
        }
        Some(custom) if custom.contains("{0}") => (custom.split_whitespace().collect(), ""),
        Some(custom) => {
            return Err(format!(
                "unknown `shell: {custom}`: use bash, sh, python, pwsh, or a command with `{{0}}` \
                 where the script's path goes"
            ));
        }
    };
    Ok(Command::Script {
        shell: argv.into_iter().map(str::to_owned).collect(),
        script,
        extension: extension.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell_of(s: Option<&str>) -> Vec<String> {
        match command(s, String::new()).expect("known shell") {
            Command::Script { shell, .. } => shell,
            Command::Argv(_) => unreachable!("scripts only"),
        }
    }

    #[test]
    fn github_default_invocations() {
        assert_eq!(shell_of(None), ["bash", "-e", "{0}"]);
        assert_eq!(
            shell_of(Some("bash")),
            ["bash", "--noprofile", "--norc", "-eo", "pipefail", "{0}"]
        );
        assert_eq!(shell_of(Some("sh")), ["sh", "-e", "{0}"]);
        assert_eq!(shell_of(Some("python")), ["python", "{0}"]);
        assert_eq!(shell_of(Some("perl -w {0}")), ["perl", "-w", "{0}"]);
    }

    #[test]
    fn unknown_and_windows_shells_are_errors() {
        assert!(command(Some("cmd"), String::new()).is_err());
        assert!(command(Some("fish"), String::new()).is_err());
    }
}
