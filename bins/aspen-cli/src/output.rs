//! Human and JSON renderings of results: bytes as text or `0x` hex, fixed-width tables, and
//! the JSON shapes scripts read. Everything here returns strings so tests can check it.

use std::io::Write;

use aspen_api::{
    ClusterStatus, KeyValue, NodeId, PeerHealth, SqlResponse, SqlValue, TxnOp, TxnOpResponse, TxnResponse,
};
use serde::Serialize;
use serde_json::{Value, json};

/// Longest value shown in multi-row tables, in characters: one huge value must not push
/// every other row off the screen. Single-key reads show the whole value.
pub const TABLE_VALUE_CHARS_MAX: usize = 64;

/// Writes `text` and a newline to stdout. A reader that went away (`| head`) is not an
/// error: the command did its work.
pub fn print(text: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(error) if error.kind() != std::io::ErrorKind::BrokenPipe => Err(error.into()),
        _ => Ok(()),
    }
}

/// Writes `value` as one line of JSON to stdout.
pub fn print_json(value: &impl Serialize) -> anyhow::Result<()> {
    print(&serde_json::to_string(value)?)
}

/// Bytes as text when they are UTF-8, otherwise as `0x` hex.
pub fn bytes_text(bytes: &[u8]) -> String {
    match std::str::from_utf8(bytes) {
        Ok(text) => text.to_string(),
        Err(_) => hex(bytes),
    }
}

/// Bytes as `0x` followed by lowercase hex digits.
pub fn hex(bytes: &[u8]) -> String {
    let mut text = String::with_capacity(2 + 2 * bytes.len());
    text.push_str("0x");
    for byte in bytes {
        text.push_str(&format!("{byte:02x}"));
    }
    text
}

/// Parses `0x`-prefixed hex as printed by [`hex`]; `None` when `text` is not such a string.
pub fn parse_hex(text: &str) -> Option<Vec<u8>> {
    let digits = text.strip_prefix("0x")?;
    if digits.len() % 2 != 0 {
        return None;
    }
    (0..digits.len()).step_by(2).map(|at| u8::from_str_radix(digits.get(at..at + 2)?, 16).ok()).collect()
}

/// Bytes for a table cell: control characters escaped so a row stays one line, and cut to
/// `chars_max` characters when given.
fn cell(bytes: &[u8], chars_max: Option<usize>) -> String {
    let text = bytes_text(bytes);
    let mut escaped = String::with_capacity(text.len());
    for character in text.chars() {
        if character.is_control() {
            escaped.extend(character.escape_default());
        } else {
            escaped.push(character);
        }
    }
    match chars_max {
        Some(max) if escaped.chars().count() > max => {
            let mut cut: String = escaped.chars().take(max.saturating_sub(1)).collect();
            cut.push('…');
            cut
        }
        _ => escaped,
    }
}

/// Bytes in JSON: a string when UTF-8, otherwise `{"hex": "..."}` (without `0x`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum JsonBytes {
    /// Valid UTF-8.
    Text(String),
    /// Anything else.
    Hex {
        /// Lowercase hex digits.
        hex: String,
    },
}

impl JsonBytes {
    /// The JSON form of `bytes`.
    pub fn new(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(text) => JsonBytes::Text(text.to_string()),
            Err(_) => JsonBytes::Hex { hex: hex(bytes)[2..].to_string() },
        }
    }
}

/// A stored record in JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JsonKeyValue {
    /// The key.
    pub key: JsonBytes,
    /// The value (empty for keys-only scans).
    pub value: JsonBytes,
    /// Writes since creation.
    pub version: u64,
    /// Revision that created the key.
    pub create_revision: u64,
    /// Revision of the last write.
    pub mod_revision: u64,
    /// Attached lease, if any.
    pub lease: Option<u64>,
}

impl From<&KeyValue> for JsonKeyValue {
    fn from(kv: &KeyValue) -> Self {
        JsonKeyValue {
            key: JsonBytes::new(&kv.key),
            value: JsonBytes::new(&kv.value),
            version: kv.version,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

/// Left-aligned columns two spaces apart, a header row and a rule under it.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|header| header.chars().count()).collect();
    for row in rows {
        for (width, text) in widths.iter_mut().zip(row) {
            *width = (*width).max(text.chars().count());
        }
    }
    let rule: Vec<String> = widths.iter().map(|width| "-".repeat(*width)).collect();
    let header: Vec<String> = headers.iter().map(|header| header.to_string()).collect();
    let mut lines = Vec::with_capacity(rows.len() + 2);
    for row in std::iter::once(&header).chain(std::iter::once(&rule)).chain(rows) {
        let mut line = String::new();
        for (column, (text, width)) in row.iter().zip(&widths).enumerate() {
            if column > 0 {
                line.push_str("  ");
            }
            line.push_str(text);
            if column + 1 < row.len() {
                line.push_str(&" ".repeat(width - text.chars().count()));
            }
        }
        lines.push(line);
    }
    lines.join("\n")
}

/// Records as a table; `value_chars_max` cuts long values (see [`TABLE_VALUE_CHARS_MAX`]).
pub fn kv_table(kvs: &[KeyValue], with_values: bool, value_chars_max: Option<usize>) -> String {
    let rows: Vec<Vec<String>> = kvs
        .iter()
        .map(|kv| {
            let mut row = vec![cell(&kv.key, None)];
            if with_values {
                row.push(cell(&kv.value, value_chars_max));
            }
            row.extend([kv.version.to_string(), kv.mod_revision.to_string()]);
            row
        })
        .collect();
    let headers: &[&str] =
        if with_values { &["KEY", "VALUE", "VERSION", "MOD_REVISION"] } else { &["KEY", "VERSION", "MOD_REVISION"] };
    table(headers, &rows)
}

/// One SQL value as table text.
fn sql_cell(value: &SqlValue) -> String {
    match value {
        SqlValue::Null => "NULL".into(),
        SqlValue::Integer(number) => number.to_string(),
        SqlValue::Real(number) => number.to_string(),
        SqlValue::Text(text) => cell(text.as_bytes(), Some(TABLE_VALUE_CHARS_MAX)),
        SqlValue::Blob(bytes) => cell(bytes, Some(TABLE_VALUE_CHARS_MAX)),
    }
}

/// One SQL value in JSON; blobs like keys and values (text when UTF-8, else hex).
fn sql_json_value(value: &SqlValue) -> Value {
    match value {
        SqlValue::Null => Value::Null,
        SqlValue::Integer(number) => json!(number),
        // NaN and infinities have no JSON form; serde_json turns them into null.
        SqlValue::Real(number) => json!(number),
        SqlValue::Text(text) => json!(text),
        SqlValue::Blob(bytes) => json!(JsonBytes::new(bytes)),
    }
}

/// A query result as a table with a row count.
pub fn sql_table(response: &SqlResponse) -> String {
    let headers: Vec<&str> = response.columns.iter().map(String::as_str).collect();
    let rows: Vec<Vec<String>> = response.rows.iter().map(|row| row.iter().map(sql_cell).collect()).collect();
    let noun = if rows.len() == 1 { "row" } else { "rows" };
    let more = if response.truncated { ", truncated by the row limit" } else { "" };
    format!("{}\n({} {noun}{more})", table(&headers, &rows), rows.len())
}

/// A query result as `{"columns": [...], "rows": [[...]], "truncated": bool}`.
pub fn sql_json(response: &SqlResponse) -> Value {
    let rows: Vec<Vec<Value>> = response.rows.iter().map(|row| row.iter().map(sql_json_value).collect()).collect();
    json!({ "columns": response.columns, "rows": rows, "truncated": response.truncated })
}

fn op_name(op: &TxnOp) -> (&'static str, &[u8]) {
    match op {
        TxnOp::Get { key } => ("get", key),
        TxnOp::Put { key, .. } => ("put", key),
        TxnOp::Delete { key } => ("delete", key),
        TxnOp::DeleteRange { range } => ("delete-prefix", &range.start),
    }
}

/// A transaction result, one line per op of the branch that ran (`ops`).
pub fn txn_text(ops: &[TxnOp], response: &TxnResponse) -> String {
    let outcome = if response.succeeded { "SUCCEEDED" } else { "FAILED (compares did not hold)" };
    let mut lines = vec![format!("{outcome} at revision {}", response.revision)];
    for (op, result) in ops.iter().zip(&response.responses) {
        let (name, key) = op_name(op);
        let detail = match result {
            TxnOpResponse::Get(Some(kv)) => {
                format!("= {} (version {}, mod_revision {})", cell(&kv.value, None), kv.version, kv.mod_revision)
            }
            TxnOpResponse::Get(None) => "(not found)".into(),
            TxnOpResponse::Put => "ok".into(),
            TxnOpResponse::Delete { deleted } => format!("deleted {deleted}"),
        };
        lines.push(format!("{name} {}: {detail}", cell(key, None)));
    }
    lines.join("\n")
}

/// A transaction result in JSON, each response tagged with its op and key.
pub fn txn_json(ops: &[TxnOp], response: &TxnResponse) -> Value {
    let responses: Vec<Value> = ops
        .iter()
        .zip(&response.responses)
        .map(|(op, result)| {
            let (name, key) = op_name(op);
            let mut entry = json!({ "op": name, "key": JsonBytes::new(key) });
            match result {
                TxnOpResponse::Get(kv) => {
                    entry["found"] = json!(kv.is_some());
                    if let Some(kv) = kv {
                        entry["kv"] = json!(JsonKeyValue::from(kv));
                    }
                }
                TxnOpResponse::Put => {}
                TxnOpResponse::Delete { deleted } => entry["deleted"] = json!(deleted),
            }
            entry
        })
        .collect();
    json!({ "succeeded": response.succeeded, "revision": response.revision, "responses": responses })
}

fn optional(number: Option<u64>) -> String {
    number.map_or("-".into(), |number| number.to_string())
}

/// One configured node in `cluster status`.
pub struct NodeRow {
    /// Its address as configured.
    pub addr: String,
    /// Its status, or why it could not be asked.
    pub answer: Result<ClusterStatus, String>,
    /// Its id in another node's membership, shown when it did not answer itself.
    pub member_id: Option<NodeId>,
}

/// One row per configured node: its status, or that it is unreachable.
pub fn status_table(nodes: &[NodeRow]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| match &node.answer {
            Ok(status) => vec![
                status.node_id.to_string(),
                format!("{:?}", status.role).to_lowercase(),
                status.term.to_string(),
                optional(status.leader),
                optional(status.last_log_index),
                optional(status.last_applied),
                node.addr.clone(),
            ],
            Err(_) => {
                let mut row = vec![node.member_id.map_or("?".into(), |id| id.to_string()), "unreachable".into()];
                row.extend(std::iter::repeat_n("-".to_string(), 4));
                row.push(node.addr.clone());
                row
            }
        })
        .collect();
    table(&["NODE", "ROLE", "TERM", "LEADER", "LAST_LOG", "APPLIED", "ADDRESS"], &rows)
}

/// How one node's failure detector sees its peers (the leader sees every member).
pub fn peer_health_table(peers: &[PeerHealth]) -> String {
    let rows: Vec<Vec<String>> = peers
        .iter()
        .map(|peer| {
            vec![
                peer.node_id.to_string(),
                format!("{:?}", peer.liveness).to_lowercase(),
                peer.consecutive_failures.to_string(),
                peer.clock_offset_ms.map_or("-".into(), |offset| format!("{offset:+} ms")),
                format!("{:?}", peer.clock).to_lowercase(),
                peer.last_error
                    .as_deref()
                    .map_or("-".into(), |error| cell(error.as_bytes(), Some(TABLE_VALUE_CHARS_MAX))),
            ]
        })
        .collect();
    table(&["PEER", "LIVENESS", "FAILURES", "CLOCK_OFFSET", "CLOCK", "LAST_ERROR"], &rows)
}

#[cfg(test)]
mod tests {
    use aspen_api::{ClockDrift, Liveness, NodeRole};

    use super::*;

    fn kv(key: &[u8], value: &[u8]) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: value.to_vec(),
            create_revision: 2,
            mod_revision: 9,
            version: 3,
            lease: None,
        }
    }

    #[test]
    fn bytes_are_text_when_utf8_and_hex_otherwise() {
        let cases: &[(&[u8], &str, Value)] = &[
            (b"hello", "hello", json!("hello")),
            (b"", "", json!("")),
            ("ключ".as_bytes(), "ключ", json!("ключ")),
            (b"\xff\x00a", "0xff0061", json!({ "hex": "ff0061" })),
        ];
        for (bytes, text, json_value) in cases {
            assert_eq!(bytes_text(bytes), *text);
            assert_eq!(serde_json::to_value(JsonBytes::new(bytes)).expect("json"), *json_value);
        }
    }

    #[test]
    fn hex_round_trips_and_rejects_non_hex() {
        for bytes in [&b""[..], b"\x00\xff", b"abc"] {
            assert_eq!(parse_hex(&hex(bytes)).as_deref(), Some(bytes));
        }
        for text in ["abc", "0x1", "0xzz", "0x€€"] {
            assert_eq!(parse_hex(text), None, "{text}");
        }
    }

    #[test]
    fn kv_table_aligns_columns_and_keeps_rows_on_one_line() {
        let kvs = [kv(b"a", b"line1\nline2"), kv(b"longer-key", b"\xff")];
        let expected = "\
KEY         VALUE         VERSION  MOD_REVISION
----------  ------------  -------  ------------
a           line1\\nline2  3        9
longer-key  0xff          3        9";
        assert_eq!(kv_table(&kvs, true, None), expected);
        let keys_only = "\
KEY         VERSION  MOD_REVISION
----------  -------  ------------
a           3        9
longer-key  3        9";
        assert_eq!(kv_table(&kvs, false, None), keys_only);
    }

    #[test]
    fn long_values_are_cut_in_multi_row_tables() {
        let text = kv_table(&[kv(b"k", &[b'v'; 100])], true, Some(10));
        assert!(text.ends_with(&format!("k    {}…  3        9", "v".repeat(9))), "{text}");
    }

    #[test]
    fn sql_results_render_as_table_and_json() {
        let response = SqlResponse {
            columns: vec!["key".into(), "n".into(), "x".into()],
            rows: vec![
                vec![SqlValue::Blob(b"a".to_vec()), SqlValue::Integer(-1), SqlValue::Null],
                vec![SqlValue::Blob(b"\xfe".to_vec()), SqlValue::Real(0.5), SqlValue::Text("t".into())],
            ],
            truncated: true,
        };
        let expected = "\
key   n    x
----  ---  ----
a     -1   NULL
0xfe  0.5  t
(2 rows, truncated by the row limit)";
        assert_eq!(sql_table(&response), expected);
        assert_eq!(
            sql_json(&response),
            json!({
                "columns": ["key", "n", "x"],
                "rows": [["a", -1, null], [{ "hex": "fe" }, 0.5, "t"]],
                "truncated": true,
            })
        );
    }

    #[test]
    fn txn_results_name_each_op() {
        let ops = vec![
            TxnOp::Put { key: b"k".to_vec(), value: b"v".to_vec(), lease: None },
            TxnOp::Get { key: b"a".to_vec() },
            TxnOp::Get { key: b"z".to_vec() },
            TxnOp::DeleteRange { range: aspen_api::KeyRange::prefix("p/") },
        ];
        let response = TxnResponse {
            revision: 12,
            succeeded: true,
            responses: vec![
                TxnOpResponse::Put,
                TxnOpResponse::Get(Some(kv(b"a", b"x"))),
                TxnOpResponse::Get(None),
                TxnOpResponse::Delete { deleted: 2 },
            ],
        };
        let expected = "\
SUCCEEDED at revision 12
put k: ok
get a: = x (version 3, mod_revision 9)
get z: (not found)
delete-prefix p/: deleted 2";
        assert_eq!(txn_text(&ops, &response), expected);
        let json_value = txn_json(&ops, &response);
        assert_eq!(json_value["succeeded"], json!(true));
        assert_eq!(json_value["responses"][1]["kv"]["value"], json!("x"));
        assert_eq!(json_value["responses"][2], json!({ "op": "get", "key": "z", "found": false }));
        assert_eq!(json_value["responses"][3], json!({ "op": "delete-prefix", "key": "p/", "deleted": 2 }));
    }

    #[test]
    fn status_table_marks_unreachable_nodes() {
        let status = ClusterStatus {
            node_id: 1,
            role: NodeRole::Leader,
            term: 4,
            leader: Some(1),
            last_log_index: Some(10),
            last_applied: None,
            voters: [1].into(),
            learners: Default::default(),
            nodes: vec![],
            peers: vec![],
        };
        let nodes = [
            NodeRow { addr: "a@1".into(), answer: Ok(status), member_id: Some(1) },
            NodeRow { addr: "b@2".into(), answer: Err("refused".into()), member_id: Some(2) },
            NodeRow { addr: "c@3".into(), answer: Err("refused".into()), member_id: None },
        ];
        let expected = "\
NODE  ROLE         TERM  LEADER  LAST_LOG  APPLIED  ADDRESS
----  -----------  ----  ------  --------  -------  -------
1     leader       4     1       10        -        a@1
2     unreachable  -     -       -         -        b@2
?     unreachable  -     -       -         -        c@3";
        assert_eq!(status_table(&nodes), expected);
    }

    #[test]
    fn peer_health_table_shows_liveness_and_clock_offsets() {
        let peers = [
            PeerHealth {
                node_id: 2,
                liveness: Liveness::Healthy,
                consecutive_failures: 0,
                last_error: None,
                clock_offset_ms: Some(-3),
                clock: ClockDrift::Ok,
            },
            PeerHealth {
                node_id: 3,
                liveness: Liveness::Down,
                consecutive_failures: 4,
                last_error: Some("connect timeout".into()),
                clock_offset_ms: None,
                clock: ClockDrift::Unknown,
            },
        ];
        let expected = "\
PEER  LIVENESS  FAILURES  CLOCK_OFFSET  CLOCK    LAST_ERROR
----  --------  --------  ------------  -------  ---------------
2     healthy   0         -3 ms         ok       -
3     down      4         -             unknown  connect timeout";
        assert_eq!(peer_health_table(&peers), expected);
    }
}
