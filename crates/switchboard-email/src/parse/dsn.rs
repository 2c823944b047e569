//! Delivery status notifications (RFC 3464): the `message/delivery-status`
//! part of a `multipart/report`, read into per-message and per-recipient
//! fields.

/// One recipient's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct RecipientReport {
    /// `Final-Recipient` without its address type (`rfc822;`).
    pub(crate) final_recipient: Option<String>,
    /// `Action`, lowercased: `failed`, `delayed`, `delivered`, `relayed`,
    /// `expanded`.
    pub(crate) action: Option<String>,
    /// `Status`: `5.1.1`.
    pub(crate) status: Option<String>,
    /// `Diagnostic-Code` without its type (`smtp;`).
    pub(crate) diagnostic: Option<String>,
}

/// What a delivery-status part says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DeliveryStatus {
    /// `Original-Envelope-Id` (the ENVID the sender gave), if any.
    pub(crate) original_envelope_id: Option<String>,
    /// One entry per recipient block.
    pub(crate) recipients: Vec<RecipientReport>,
}

impl DeliveryStatus {
    /// The first recipient whose delivery failed.
    pub(crate) fn first_failure(&self) -> Option<&RecipientReport> {
        self.recipients
            .iter()
            .find(|r| r.action.as_deref() == Some("failed"))
    }
}

/// Reads the body of a `message/delivery-status` part. Lenient: unknown
/// fields are skipped, bad lines ignored; never panics.
pub(crate) fn parse_delivery_status(body: &str) -> DeliveryStatus {
    let mut out = DeliveryStatus::default();
    let body = body.replace("\r\n", "\n");
    let mut first = true;
    for block in body.split("\n\n") {
        let fields = unfold(block);
        if fields.is_empty() {
            continue;
        }
        let get = |name: &str| {
            fields
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let is_recipient = get("Final-Recipient").is_some() || get("Action").is_some();
        if first && !is_recipient {
            out.original_envelope_id = get("Original-Envelope-Id");
        } else if is_recipient {
            out.recipients.push(RecipientReport {
                final_recipient: get("Final-Recipient").map(|v| strip_type(&v)),
                action: get("Action").map(|v| v.trim().to_ascii_lowercase()),
                status: get("Status").and_then(|v| {
                    v.split_whitespace()
                        .next()
                        .map(str::to_owned)
                        .filter(|s| s.chars().all(|c| c.is_ascii_digit() || c == '.'))
                }),
                diagnostic: get("Diagnostic-Code").map(|v| strip_type(&v)),
            });
        }
        first = false;
    }
    out
}

/// `rfc822; a@b` → `a@b`.
fn strip_type(v: &str) -> String {
    match v.split_once(';') {
        Some((kind, rest)) if !kind.trim().contains(' ') => rest.trim().to_owned(),
        _ => v.trim().to_owned(),
    }
}

/// Header-style fields of one block, continuation lines joined.
fn unfold(block: &str) -> Vec<(String, String)> {
    let mut fields: Vec<(String, String)> = Vec::new();
    for line in block.lines() {
        if line.starts_with([' ', '\t']) {
            if let Some((_, value)) = fields.last_mut() {
                value.push(' ');
                value.push_str(line.trim());
            }
        } else if let Some((name, value)) = line.split_once(':') {
            let name = name.trim();
            if !name.is_empty() && !name.contains(' ') {
                fields.push((name.to_owned(), value.trim().to_owned()));
            }
        }
    }
    fields
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_per_message_and_per_recipient_fields() {
        let body = "Reporting-MTA: dns; mx.example.net\r\nOriginal-Envelope-Id: abc\r\n\r\n\
            Final-Recipient: rfc822; Bob@example.org\r\nAction: Failed\r\nStatus: 5.1.1 (bad)\r\n\
            Diagnostic-Code: smtp; 550 5.1.1 user unknown\r\n  (mailbox gone)\r\n\r\n\
            Final-Recipient: rfc822; c@example.org\r\nAction: delayed\r\nStatus: 4.4.7\r\n";
        let dsn = parse_delivery_status(body);
        assert_eq!(dsn.original_envelope_id.as_deref(), Some("abc"));
        assert_eq!(dsn.recipients.len(), 2);
        let failed = dsn.first_failure().unwrap();
        assert_eq!(failed.final_recipient.as_deref(), Some("Bob@example.org"));
        assert_eq!(failed.status.as_deref(), Some("5.1.1"));
        assert_eq!(
            failed.diagnostic.as_deref(),
            Some("550 5.1.1 user unknown (mailbox gone)")
        );
        assert_eq!(dsn.recipients[1].action.as_deref(), Some("delayed"));
    }

    #[test]
    fn tolerates_garbage() {
        for body in ["", "\n\n\n", ":::\n\t\n", "Action\nStatus: x.y\n\n\u{0}"] {
            let dsn = parse_delivery_status(body);
            assert!(dsn.first_failure().is_none());
        }
    }
}
