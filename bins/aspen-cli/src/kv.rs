//! The `kv` and `sql` commands: build the request, call the cluster, print the result.

use std::io::Read;
use std::path::Path;

use anyhow::{Context, bail};
use aspen_api::limits::{MAX_RPC_MESSAGE_SIZE, MAX_SQL_QUERY_SIZE};
use aspen_api::{
    GetRequest, KeyRange, ReadConsistency, ScanRequest, SqlRequest, WriteCommand, WriteResponse, validate_key,
};
use aspen_client::AspenClient;
use serde_json::json;

use crate::Outcome;
use crate::cli::{KvCommand, ScanArgs, SqlArgs, TxnArgs};
use crate::output::{
    JsonKeyValue, TABLE_VALUE_CHARS_MAX, bytes_text, hex, kv_table, parse_hex, print, print_json, sql_json, sql_table,
    txn_json, txn_text,
};
use aspen_client::txn_syntax::{excerpt, parse_txn};

fn consistency(stale: bool) -> ReadConsistency {
    if stale { ReadConsistency::Stale } else { ReadConsistency::Linearizable }
}

fn checked_key(key: String) -> anyhow::Result<Vec<u8>> {
    validate_key(key.as_bytes()).with_context(|| format!("invalid key {key:?}"))?;
    Ok(key.into_bytes())
}

/// Runs one `kv` command.
pub async fn run(client: &AspenClient, command: KvCommand, json: bool) -> anyhow::Result<Outcome> {
    match command {
        KvCommand::Get { key, stale } => get(client, checked_key(key)?, stale, json).await,
        KvCommand::Put { key, value, lease } => {
            let command = WriteCommand::Put { key: key.into_bytes(), value: value.into_bytes(), lease };
            match client.write(command).await? {
                WriteResponse::Put { revision } if json => print_json(&json!({ "revision": revision }))?,
                WriteResponse::Put { revision } => print(&format!("OK (revision {revision})"))?,
                other => bail!("unexpected reply to a put: {other:?}"),
            }
            Ok(Outcome::Done)
        }
        KvCommand::Delete { key, prefix } => {
            let key = checked_key(key)?;
            let response = if prefix { client.delete_prefix(key).await? } else { client.delete(key).await? };
            match response {
                WriteResponse::Delete { revision, deleted } if json => {
                    print_json(&json!({ "deleted": deleted, "revision": revision }))?
                }
                WriteResponse::Delete { revision, deleted } => {
                    let noun = if deleted == 1 { "key" } else { "keys" };
                    print(&format!("deleted {deleted} {noun} (revision {revision})"))?
                }
                other => bail!("unexpected reply to a delete: {other:?}"),
            }
            Ok(Outcome::Done)
        }
        KvCommand::Scan(args) => scan(client, args, json).await,
        KvCommand::Txn(args) => txn(client, args, json).await,
    }
}

async fn get(client: &AspenClient, key: Vec<u8>, stale: bool, json: bool) -> anyhow::Result<Outcome> {
    let response = client.get_with(GetRequest { key, consistency: consistency(stale) }).await?;
    let Some(kv) = response.kv else {
        if json {
            print_json(&json!({ "found": false }))?;
        } else {
            print("(not found)")?;
        }
        return Ok(Outcome::NotFound);
    };
    if json {
        print_json(&json!({ "found": true, "kv": JsonKeyValue::from(&kv) }))?;
    } else {
        print(&kv_table(&[kv], true, None))?;
    }
    Ok(Outcome::Done)
}

/// The key range a scan's options select: a prefix, `[from, to)`, or everything.
fn scan_range(args: &ScanArgs) -> KeyRange {
    match (&args.prefix, &args.from, &args.to) {
        (Some(prefix), _, _) => KeyRange::prefix(prefix.as_bytes()),
        (None, from, to) => KeyRange {
            start: from.as_deref().unwrap_or_default().as_bytes().to_vec(),
            end: to.as_ref().map(|to| to.as_bytes().to_vec()),
        },
    }
}

/// A continuation token (a key) as text a shell passes through unquoted, else as 0x-hex so
/// any key survives the round trip through --after.
fn continuation_token(key: &[u8]) -> String {
    let shell_safe = |byte: &u8| byte.is_ascii_alphanumeric() || b"/_.-:@+=,%".contains(byte);
    if !key.is_empty() && !key.starts_with(b"0x") && key.iter().all(shell_safe) {
        return bytes_text(key);
    }
    hex(key)
}

/// The key a continuation token names: 0x-hex as printed for binary keys, else plain text.
fn after_key(token: &str) -> Vec<u8> {
    parse_hex(token).unwrap_or_else(|| token.as_bytes().to_vec())
}

async fn scan(client: &AspenClient, args: ScanArgs, json: bool) -> anyhow::Result<Outcome> {
    let request = ScanRequest {
        range: scan_range(&args),
        limit: args.limit,
        keys_only: args.keys_only,
        count_only: args.count,
        after: args.after.as_deref().map(after_key),
        consistency: consistency(args.stale),
    };
    request.validate().context("invalid scan")?;
    let response = client.scan(request).await?;
    if args.count {
        if json {
            print_json(&json!({ "count": response.count, "revision": response.revision }))?;
        } else {
            print(&response.count.to_string())?;
        }
        return Ok(Outcome::Done);
    }
    let continuation = response.continuation.as_deref().map(continuation_token);
    if json {
        let kvs: Vec<JsonKeyValue> = response.kvs.iter().map(JsonKeyValue::from).collect();
        let body =
            json!({ "kvs": kvs, "count": response.count, "continuation": continuation, "revision": response.revision });
        print_json(&body)?;
        return Ok(Outcome::Done);
    }
    if response.kvs.is_empty() {
        print("(no keys)")?;
    } else {
        print(&kv_table(&response.kvs, !args.keys_only, Some(TABLE_VALUE_CHARS_MAX)))?;
    }
    if let Some(token) = continuation {
        print(&format!("(more keys: continue with --after {token})"))?;
    }
    Ok(Outcome::Done)
}

/// Reads a text argument: from stdin when it is `-`, else from `path` when given.
fn read_text(path: &Path, bytes_max: usize) -> anyhow::Result<String> {
    let mut text = String::new();
    let limit = bytes_max as u64 + 1;
    let read = if path == Path::new("-") {
        std::io::stdin().lock().take(limit).read_to_string(&mut text).context("cannot read stdin")?
    } else {
        let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        file.take(limit).read_to_string(&mut text).with_context(|| format!("cannot read {}", path.display()))?
    };
    if read > bytes_max {
        bail!("input is larger than {bytes_max} bytes");
    }
    Ok(text)
}

async fn txn(client: &AspenClient, args: TxnArgs, json: bool) -> anyhow::Result<Outcome> {
    let source = match (args.spec, args.file) {
        (_, Some(path)) => read_text(&path, MAX_RPC_MESSAGE_SIZE)?,
        (Some(spec), None) if spec == "-" => read_text(Path::new("-"), MAX_RPC_MESSAGE_SIZE)?,
        (Some(spec), None) => spec,
        (None, None) => bail!("give the transaction text, `-` for stdin, or --file"),
    };
    let request = match parse_txn(&source) {
        Ok(request) => request,
        Err(error) => bail!("invalid transaction: {error}\n{}", excerpt(&source, &error)),
    };
    request.validate().context("invalid transaction")?;
    let response = client.txn(request.clone()).await?;
    let ops = if response.succeeded { &request.success } else { &request.failure };
    if ops.len() != response.responses.len() {
        bail!("the node returned {} results for {} operations", response.responses.len(), ops.len());
    }
    if json {
        print_json(&txn_json(ops, &response))?;
    } else {
        print(&txn_text(ops, &response))?;
    }
    Ok(Outcome::Done)
}

/// Runs `sql`.
pub async fn sql(client: &AspenClient, args: SqlArgs, json: bool) -> anyhow::Result<Outcome> {
    let query = if args.query == "-" { read_text(Path::new("-"), MAX_SQL_QUERY_SIZE)? } else { args.query };
    let request =
        SqlRequest { query, row_limit: args.limit, timeout_ms: args.timeout_ms, consistency: consistency(args.stale) };
    request.validate().context("invalid query")?;
    let response = client.sql(request).await?;
    if json {
        print_json(&sql_json(&response))?;
    } else {
        print(&sql_table(&response))?;
    }
    Ok(Outcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_args(prefix: Option<&str>, from: Option<&str>, to: Option<&str>) -> ScanArgs {
        ScanArgs {
            prefix: prefix.map(str::to_string),
            from: from.map(str::to_string),
            to: to.map(str::to_string),
            limit: 100,
            keys_only: false,
            count: false,
            after: None,
            stale: false,
        }
    }

    #[test]
    fn scan_options_select_the_expected_range() {
        let cases = [
            (scan_args(None, None, None), KeyRange { start: vec![], end: None }),
            (scan_args(Some("app/"), None, None), KeyRange::between("app/", "app0")),
            (scan_args(None, Some("b"), None), KeyRange { start: b"b".to_vec(), end: None }),
            (scan_args(None, Some("b"), Some("d")), KeyRange::between("b", "d")),
            (scan_args(None, None, Some("d")), KeyRange::between("", "d")),
        ];
        for (args, expected) in cases {
            assert_eq!(scan_range(&args), expected, "{args:?}");
        }
    }

    #[test]
    fn continuation_tokens_round_trip_through_after() {
        let cases: &[(&[u8], &str)] = &[
            (b"app/k3", "app/k3"),
            (b"a b", "0x612062"),
            (b"0x41", "0x30783431"),
            (b"\xff", "0xff"),
            (b"it's", "0x69742773"),
        ];
        for (key, token) in cases {
            assert_eq!(continuation_token(key), *token);
            assert_eq!(after_key(token), *key);
        }
        assert_eq!(after_key("0xzz"), b"0xzz");
    }

    #[test]
    fn text_inputs_are_bounded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("txn.txt");
        std::fs::write(&path, "get \"k\"").expect("write");
        assert_eq!(read_text(&path, 7).expect("fits"), "get \"k\"");
        assert!(read_text(&path, 6).is_err());
        assert!(read_text(&dir.path().join("missing"), 6).is_err());
    }
}
