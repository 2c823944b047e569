//! A Meta webhook body: `object` names the product (`whatsapp_business_account`,
//! `page`, `instagram`); `entry[]` holds one or many entries, each with
//! `changes[]` (WhatsApp, Instagram comments) or `messaging[]` (Messenger,
//! Instagram direct). Every item becomes its own [`Parsed`].

use serde_json::Value;
use switchboard_core::Channel;

use crate::common::{Malformed, Parsed, Stamp};
use crate::{messenger, whatsapp};

/// Parses a whole body. The signature was checked on these exact bytes
/// before; nothing here re-serializes them.
pub fn parse(body: &[u8], stamp: &Stamp) -> Result<Vec<Parsed>, Malformed> {
    let v: Value = serde_json::from_slice(body)
        .map_err(|e| Malformed::new(".", format!("malformed json: {e}")))?;
    let object = v
        .get("object")
        .and_then(Value::as_str)
        .ok_or_else(|| Malformed::new("object", "missing"))?;
    if !matches!(object, "whatsapp_business_account" | "page" | "instagram") {
        return Err(Malformed::new(
            "object",
            format!("{object:?} is not whatsapp_business_account, page or instagram"),
        ));
    }
    let entries = v
        .get("entry")
        .and_then(Value::as_array)
        .ok_or_else(|| Malformed::new("entry", "missing or not a list"))?;
    let mut out = Vec::new();
    let mut next = 0usize;
    for (i, entry) in entries.iter().enumerate() {
        let path = format!("entry[{i}]");
        match object {
            "whatsapp_business_account" => {
                let changes = entry
                    .get("changes")
                    .and_then(Value::as_array)
                    .ok_or_else(|| Malformed::new(format!("{path}.changes"), "missing"))?;
                for (j, c) in changes.iter().enumerate() {
                    let p = format!("{path}.changes[{j}]");
                    let field = c
                        .get("field")
                        .and_then(Value::as_str)
                        .ok_or_else(|| Malformed::new(format!("{p}.field"), "missing"))?;
                    let value = c
                        .get("value")
                        .ok_or_else(|| Malformed::new(format!("{p}.value"), "missing"))?;
                    whatsapp::parse_value(
                        field,
                        value,
                        &format!("{p}.value"),
                        stamp,
                        &mut next,
                        &mut out,
                    )?;
                }
            }
            "page" | "instagram" => {
                let channel = if object == "page" {
                    Channel::Messenger
                } else {
                    Channel::Instagram
                };
                let mut any = false;
                if let Some(items) = entry.get("messaging").and_then(Value::as_array) {
                    any = true;
                    for (j, item) in items.iter().enumerate() {
                        let p = format!("{path}.messaging[{j}]");
                        out.push(messenger::parse_item(channel, item, &p, stamp, &mut next)?);
                    }
                }
                if let Some(changes) = entry.get("changes").and_then(Value::as_array) {
                    any = true;
                    for (j, c) in changes.iter().enumerate() {
                        let field = c.get("field").and_then(Value::as_str).unwrap_or("");
                        // Instagram Login apps deliver direct messages as
                        // `changes[]` with field `messages` and the same
                        // item as `value`.
                        if field == "messages"
                            && let Some(value) = c.get("value")
                        {
                            let p = format!("{path}.changes[{j}].value");
                            out.push(messenger::parse_item(channel, value, &p, stamp, &mut next)?);
                        } else {
                            out.push(Parsed::ignored(format!(
                                "{channel} change of field {field:?} is not handled"
                            )));
                        }
                    }
                }
                if !any {
                    out.push(Parsed::ignored(format!(
                        "{channel} entry without messaging or changes"
                    )));
                }
            }
            other => {
                return Err(Malformed::new(
                    "object",
                    format!("{other:?} is not whatsapp_business_account, page or instagram"),
                ));
            }
        }
    }
    Ok(out)
}
