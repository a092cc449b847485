//! Spawning external commands: actions are printed and run in the foreground,
//! probes are run quietly for their output.

use std::fmt;
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, Result, bail};

/// A command that ran and failed. Kept as a type so `main` can pass its exit
/// code through.
#[derive(Debug)]
pub struct CommandFailed {
    command: String,
    status: ExitStatus,
}

impl CommandFailed {
    /// The command's own exit code, or 128 + signal as a shell reports a
    /// killed process.
    pub fn exit_code(&self) -> i32 {
        self.status
            .code()
            .or_else(|| self.status.signal().map(|signal| 128 + signal))
            .unwrap_or(1)
    }
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` failed ({})", self.command, self.status)
    }
}

impl std::error::Error for CommandFailed {}

/// Prints `cmd` (with the environment it sets), runs it with the terminal's
/// stdio, and fails with its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("could not start `{shown}` (is it installed and on PATH?)"))?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailed {
            command: shown,
            status,
        }
        .into())
    }
}

/// Runs `cmd` without printing it and returns its stdout: for asking the host
/// what it has (versions, packages), not for changing it.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}` (is it installed and on PATH?)"))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        bail!("`{shown}` failed ({}): {}", out.status, stderr.trim());
    }
    String::from_utf8(out.stdout).with_context(|| format!("`{shown}` printed non-UTF-8 output"))
}

/// `cmd` as a shell line a developer can copy: `VAR=value program args`.
fn display(cmd: &Command) -> String {
    let envs = cmd.get_envs().filter_map(|(key, value)| {
        value.map(|value| {
            format!(
                "{}={}",
                key.to_string_lossy(),
                quote(&value.to_string_lossy())
            )
        })
    });
    let program = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|word| quote(&word.to_string_lossy()));
    envs.chain(program).collect::<Vec<_>>().join(" ")
}

fn quote(word: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_=+/.,:@%".contains(c);
    if !word.is_empty() && word.chars().all(plain) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_what_a_shell_would_split() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "a b"])
            .env("RUSTFLAGS", "-L /x -l dylib=y");
        assert_eq!(
            display(&cmd),
            "RUSTFLAGS='-L /x -l dylib=y' cargo test -- 'a b'"
        );
    }

    #[test]
    fn run_reports_the_exit_code() {
        let err = run(Command::new("sh").args(["-c", "exit 7"])).unwrap_err();
        let failed = err.downcast_ref::<CommandFailed>().unwrap();
        assert_eq!(failed.exit_code(), 7);
    }
}
