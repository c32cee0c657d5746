//! What the modes print: one JSON summary line on stdout (and optionally in a file), and the
//! JSON progress lines a `send` child prints for its parent.

use std::io::Write;
use std::path::Path;

use serde::Serialize;

use crate::LoadgenError;

/// Prints `summary` as one JSON line on stdout and, when `file` is given, writes it there.
pub fn emit(summary: &impl Serialize, file: Option<&Path>) -> Result<(), LoadgenError> {
    let json = serde_json::to_string(summary).expect("summaries always serialize");
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{json}")
        .and_then(|()| stdout.flush())
        .map_err(|e| LoadgenError::io("write the summary to stdout", e))?;
    if let Some(path) = file {
        std::fs::write(path, format!("{json}\n"))
            .map_err(|e| LoadgenError::io("write the summary file", e))?;
    }
    Ok(())
}

/// Prints `{"progress":…}` on stdout (a `send` child's report to its parent).
pub fn progress_line(progress: &impl Serialize) {
    let line = serde_json::json!({ "progress": progress });
    let mut stdout = std::io::stdout().lock();
    // The parent going away is no reason to stop sending; it only loses the progress.
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// `n` with thousands separators, for progress lines.
pub fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_are_grouped() {
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1000), "1,000");
        assert_eq!(grouped(12_345_678), "12,345,678");
    }
}
