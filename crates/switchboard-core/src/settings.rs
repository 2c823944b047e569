//! Helpers every crate's configuration uses: durations as written in
//! `config/switchboard.toml`, and secrets given inline or in a file. Pure:
//! reading a secret's file is the caller's, passed in as `read`.

use std::time::Duration;

use crate::Secret;

/// Parses "30s", "15m", "24h", "7d", "250ms".
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{s:?} has no unit (ms, s, m, h, d)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let secs = match unit.trim() {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => return Err(format!("{s:?} has unknown unit {other:?} (ms, s, m, h, d)")),
    };
    Ok(Duration::from_secs(secs))
}

/// A secret set as `key` (inline `value`) or `key_file` (a file, read with
/// `read`, trailing whitespace trimmed). Each problem goes to `problems` as
/// `KEY: what`; `None` when it is unusable or (not `required`) unset.
pub fn secret_setting(
    key: &str,
    value: &str,
    file: &str,
    required: bool,
    read: impl FnOnce(&str) -> std::io::Result<String>,
    problems: &mut Vec<String>,
) -> Option<Secret> {
    match (value.is_empty(), file.is_empty()) {
        (false, true) => Some(Secret::new(value)),
        (true, false) => match read(file) {
            Ok(s) => Some(Secret::new(s.trim_end())),
            Err(e) => {
                problems.push(format!("{key}_file: cannot read {file}: {e}"));
                None
            }
        },
        (true, true) => {
            if required {
                problems.push(format!("{key}: set {key} or {key}_file"));
            }
            None
        }
        (false, false) => {
            problems.push(format!("{key}: set {key} or {key}_file, not both"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{parse_duration, secret_setting};

    #[test]
    fn durations_in_the_documented_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration(" 30s "), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("15m"), Ok(Duration::from_secs(900)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("3w").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn secrets_inline_or_from_a_file_never_both() {
        let mut p = Vec::new();
        let unread = |_: &str| -> std::io::Result<String> { panic!("not read") };
        let inline = secret_setting("token", "abc", "", true, unread, &mut p);
        assert_eq!(inline.unwrap().expose(), "abc");
        let filed = secret_setting("token", "", "/f", true, |_| Ok("xyz\n".into()), &mut p);
        assert_eq!(filed.unwrap().expose(), "xyz");
        assert!(p.is_empty());
        assert!(secret_setting("token", "", "", false, unread, &mut p).is_none());
        assert!(p.is_empty(), "unset and optional is no problem");
        secret_setting("token", "", "", true, unread, &mut p);
        secret_setting("token", "a", "/f", true, unread, &mut p);
        let missing = |_: &str| Err(std::io::Error::other("gone"));
        secret_setting("token", "", "/f", true, missing, &mut p);
        assert_eq!(
            p,
            [
                "token: set token or token_file",
                "token: set token or token_file, not both",
                "token_file: cannot read /f: gone",
            ]
        );
    }
}
