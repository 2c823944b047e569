//! Writes the published JSON Schemas; a test keeps `docs/schemas/` in step.

use std::path::Path;

use anyhow::Context as _;

/// The files for every record: `NAME.schema.json` and `NAME.example.json`,
/// pretty-printed with a final newline.
pub fn files() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for doc in switchboard_core::schemas::all() {
        for (suffix, value) in [("schema", &doc.schema), ("example", &doc.example)] {
            let mut text = serde_json::to_string_pretty(value).expect("json serializes");
            text.push('\n');
            out.push((format!("{}.{suffix}.json", doc.name), text));
        }
    }
    out
}

/// Writes every file into `dir`.
pub fn write(dir: &Path) -> anyhow::Result<usize> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let files = files();
    for (name, text) in &files {
        let path = dir.join(name);
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(files.len())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    #[test]
    fn committed_schemas_match_the_types() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../docs/schemas");
        let mut stale = Vec::new();
        for (name, text) in super::files() {
            match std::fs::read_to_string(dir.join(&name)) {
                Ok(committed) if committed == text => {}
                Ok(_) => stale.push(format!("{name} differs")),
                Err(_) => stale.push(format!("{name} is missing")),
            }
        }
        assert!(
            stale.is_empty(),
            "docs/schemas is out of date ({}); regenerate with `cargo run -p switchboard -- schemas`",
            stale.join(", ")
        );
    }
}
