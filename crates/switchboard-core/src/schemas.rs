//! JSON Schemas for every record, generated from the Rust types, with one
//! example each. `docs/schemas/` holds the committed copies; a test in the
//! binary crate fails when they drift.

use schemars::{JsonSchema, schema_for};
use serde_json::{Value, json};

use crate::envelope::EnvelopeSchema;
use crate::records::{
    ApiMessage, ApiMessageSchema, CommandSchema, DeadLetterSchema, DeliverySchema, EventSchema,
    OutboundSchema,
};
use crate::{Command, DeadLetter, Delivery, Envelope, Event, OutboundRequest};

/// One published record type.
pub struct SchemaDoc {
    /// File stem under `docs/schemas/` (`envelope.v1`).
    pub name: &'static str,
    /// The JSON Schema.
    pub schema: Value,
    /// An example record that decodes with this build.
    pub example: Value,
}

/// Fields whose default is made at decode time (a fresh UUIDv7, the current
/// time): schemars would print the value it happened to make, so the schema
/// states the rule instead.
const GENERATED_DEFAULTS: [&str; 3] = ["id", "at", "received_at"];

fn schema<T: JsonSchema>() -> Value {
    let mut value = serde_json::to_value(schema_for!(T)).expect("a schema serializes");
    if let Some(props) = value.get_mut("properties").and_then(Value::as_object_mut) {
        for name in GENERATED_DEFAULTS {
            if let Some(Value::Object(prop)) = props.get_mut(name)
                && prop.remove("default").is_some()
            {
                prop.insert(
                    "$comment".into(),
                    json!("filled in by switchboard when absent"),
                );
            }
        }
    }
    value
}

/// Every record type with its schema and example.
pub fn all() -> Vec<SchemaDoc> {
    vec![
        SchemaDoc {
            name: "envelope.v1",
            schema: schema::<Envelope>(),
            example: json!({
                "schema": EnvelopeSchema::NAME,
                "id": "01936f0e-7c1a-7000-8000-00000000a001",
                "idempotency_key": "email:support@example.com:CAF1x@mail.example.org",
                "channel": "email",
                "provider": "imap",
                "account": "support@example.com",
                "direction": "inbound",
                "from": {"kind": "email", "value": "ada@example.org"},
                "to": {"kind": "email", "value": "support@example.com"},
                "sent_at": "2026-11-02T09:14:00Z",
                "received_at": "2026-11-02T09:14:03Z",
                "subject": "Re: order 1042",
                "text": "The parcel has not arrived yet.",
                "attachments": [{
                    "name": "photo.jpg", "content_type": "image/jpeg", "size": 48213,
                    "storage_ref": "sha256/6b/6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b",
                    "sha256": "6b86b273ff34fce19d6b804eff5a3f5747ada4eaa22f1d49c01e52ddb7875b4b"
                }],
                "thread_hints": {
                    "message_id": "CAF1x@mail.example.org",
                    "in_reply_to": ["sb.01936f0e@switchboard.example.com"],
                    "references": ["sb.01936f0e@switchboard.example.com"]
                },
                "provider_raw": {"content_type": "message/rfc822", "storage_ref": "sha256/aa/aa01"},
                "trace": {"request_id": "imap-support-4711"}
            }),
        },
        SchemaDoc {
            name: "outbound.v1",
            schema: schema::<OutboundRequest>(),
            example: json!({
                "schema": OutboundSchema::NAME,
                "idempotency_key": "crm-reply-88121",
                "conversation_id": "01936f0e-7c1a-7000-8000-00000000c001",
                "text": "A replacement is on its way."
            }),
        },
        SchemaDoc {
            name: "event.v1",
            schema: schema::<Event>(),
            example: json!({
                "schema": EventSchema::NAME,
                "id": "01936f0e-7c1a-7000-8000-00000000e001",
                "customer_id": "01936f0e-7c1a-7000-8000-00000000b001",
                "at": "2026-11-02T09:14:03Z",
                "type": "message.received",
                "message_id": "01936f0e-7c1a-7000-8000-00000000a001",
                "conversation_id": "01936f0e-7c1a-7000-8000-00000000c001",
                "channel": "email",
                "rule": "in_reply_to",
                "reopened": false
            }),
        },
        SchemaDoc {
            name: "delivery.v1",
            schema: schema::<Delivery>(),
            example: json!({
                "schema": DeliverySchema::NAME,
                "id": "01936f0e-7c1a-7000-8000-00000000d001",
                "message_id": "01936f0e-7c1a-7000-8000-00000000a002",
                "conversation_id": "01936f0e-7c1a-7000-8000-00000000c001",
                "idempotency_key": "crm-reply-88121",
                "channel": "sms",
                "status": "failed",
                "at": "2026-11-02T09:20:00Z",
                "attempt": 1,
                "error": {"reason": "recipient unsubscribed", "code": "21610", "retryable": false}
            }),
        },
        SchemaDoc {
            name: "command.v1",
            schema: schema::<Command>(),
            example: json!({
                "schema": CommandSchema::NAME,
                "id": "01936f0e-7c1a-7000-8000-00000000f001",
                "at": "2026-11-02T10:00:00Z",
                "type": "identity.link",
                "a": {"kind": "email", "value": "ada@example.org"},
                "b": {"kind": "phone", "value": "+14155550100"},
                "evidence": "crm contact 5521 lists both"
            }),
        },
        SchemaDoc {
            name: "dlq.v1",
            schema: schema::<DeadLetter>(),
            example: json!({
                "schema": DeadLetterSchema::NAME,
                "id": "01936f0e-7c1a-7000-8000-0000000dead1",
                "topic": "switchboard.inbound.v1",
                "partition": 3,
                "offset": 1041,
                "group": "switchboard-router",
                "key_base64": "ZW1haWw6YWRhQGV4YW1wbGUub3Jn",
                "payload_base64": "eyJzY2hlbWEiOiJ4In0=",
                "error": "field `schema`: unknown schema version \"x\", this build reads \"switchboard.envelope.v1\"",
                "retryable": false,
                "at": "2026-11-02T09:14:04Z"
            }),
        },
        SchemaDoc {
            name: "api-message.v1",
            schema: schema::<ApiMessage>(),
            example: json!({
                "schema": ApiMessageSchema::NAME,
                "message_id": "01936f0e-7c1a-7000-8000-00000000a002",
                "idempotency_key": "crm-reply-88121",
                "conversation_id": "01936f0e-7c1a-7000-8000-00000000c001",
                "customer_id": "01936f0e-7c1a-7000-8000-00000000b001",
                "account": "crm",
                "to": {"kind": "external", "value": "crm-contact-5521"},
                "text": "A replacement is on its way.",
                "attempt": 1
            }),
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_example_decodes() {
        for doc in all() {
            let bytes = serde_json::to_vec(&doc.example).unwrap();
            let res = match doc.name {
                "envelope.v1" => crate::decode_envelope(&bytes).map(drop),
                "outbound.v1" => crate::decode_outbound(&bytes).map(drop),
                "event.v1" => crate::decode::<Event>(&bytes, EventSchema::NAME).map(drop),
                "delivery.v1" => crate::decode::<Delivery>(&bytes, DeliverySchema::NAME).map(drop),
                "command.v1" => crate::decode_command(&bytes).map(drop),
                "dlq.v1" => crate::decode::<DeadLetter>(&bytes, DeadLetterSchema::NAME).map(drop),
                "api-message.v1" => {
                    crate::decode::<ApiMessage>(&bytes, ApiMessageSchema::NAME).map(drop)
                }
                other => panic!("no decoder for {other}"),
            };
            res.unwrap_or_else(|e| panic!("{}: {e}", doc.name));
        }
    }
}
