//! A readable transaction syntax (used by `aspen-cli kv txn`), parsed into a [`TxnRequest`].
//!
//! ```text
//! txn     = "if" compare { "and" compare } "then" ops [ "else" ops ]
//!         | [ "then" ] ops
//! compare = target "(" STRING ")" ( "==" | "!=" | "<" | ">" ) operand
//! target  = "value" | "version" | "create_revision" | "mod_revision"
//! operand = STRING (for value) | NUMBER (for the others)
//! ops     = [ op { ";" op } [ ";" ] ]
//! op      = "put" STRING STRING | "get" STRING | "delete" STRING | "delete-prefix" STRING
//! ```
//!
//! Keywords are case-insensitive, `#` starts a comment that runs to the end of the line, and
//! strings are double-quoted with the escapes `\"`, `\\`, `\n`, `\t` and `\xHH` (one byte).

use aspen_api::limits::{MAX_TXN_COMPARES, MAX_TXN_OPS};
use aspen_api::{Compare, CompareOp, CompareTarget, KeyRange, TxnOp, TxnRequest};

/// A syntax error, with the 1-based line and column (in characters) where it was found.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {kind}")]
pub struct TxnSyntaxError {
    /// Line of the problem, from 1.
    pub line: usize,
    /// Column of the problem in characters, from 1.
    pub column: usize,
    /// What is wrong.
    pub kind: TxnSyntaxErrorKind,
}

/// What is wrong with a transaction text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TxnSyntaxErrorKind {
    /// A string has no closing quote.
    #[error("unterminated string")]
    UnterminatedString,
    /// A backslash escape other than the supported ones.
    #[error("unknown escape `\\{0}` (use \\\", \\\\, \\n, \\t or \\xHH)")]
    UnknownEscape(char),
    /// `\x` not followed by two hex digits.
    #[error("`\\x` must be followed by two hex digits")]
    BadHexEscape,
    /// `=` or `!` without the `=` that makes it an operator.
    #[error("`{0}` is not an operator; did you mean `{0}=`?")]
    IncompleteOperator(char),
    /// A character that starts no token.
    #[error("unexpected character `{0}`")]
    UnexpectedChar(char),
    /// A number above `u64::MAX`.
    #[error("number does not fit in 64 bits")]
    NumberTooLarge,
    /// The parser needed one thing and found another.
    #[error("expected {expected}, found {found}")]
    Expected {
        /// What the grammar allows here.
        expected: &'static str,
        /// What the text has instead.
        found: String,
    },
    /// An `else` branch in a transaction without compares would never run.
    #[error("`else` needs an `if`: without compares the `then` branch always runs")]
    ElseWithoutIf,
    /// More compares than the server accepts.
    #[error("more than {max} compares")]
    TooManyCompares {
        /// The limit.
        max: usize,
    },
    /// More operations in one branch than the server accepts.
    #[error("more than {max} operations in one branch")]
    TooManyOps {
        /// The limit.
        max: usize,
    },
}

/// Parses a transaction text.
pub fn parse_txn(source: &str) -> Result<TxnRequest, TxnSyntaxError> {
    let tokens = tokenize(source).map_err(|(offset, kind)| locate(source, offset, kind))?;
    let mut parser = Parser { tokens, position: 0, source_len: source.len() };
    parser.txn().map_err(|(offset, kind)| locate(source, offset, kind))
}

/// The line of `source` holding the error, with a caret under the column: for terminals.
pub fn excerpt(source: &str, error: &TxnSyntaxError) -> String {
    let line = source.lines().nth(error.line - 1).unwrap_or("");
    format!("  {line}\n  {}^", " ".repeat(error.column - 1))
}

fn locate(source: &str, offset: usize, kind: TxnSyntaxErrorKind) -> TxnSyntaxError {
    let before = &source[..offset.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |newline| newline + 1);
    let column = before[line_start..].chars().count() + 1;
    TxnSyntaxError { line, column, kind }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Word(String),
    Str(Vec<u8>),
    Number(u64),
    LeftParen,
    RightParen,
    Semicolon,
    Op(CompareOp),
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(word) => format!("`{word}`"),
            Token::Str(_) => "a string".into(),
            Token::Number(number) => format!("number {number}"),
            Token::LeftParen => "`(`".into(),
            Token::RightParen => "`)`".into(),
            Token::Semicolon => "`;`".into(),
            Token::Op(op) => format!("`{}`", op_text(*op)),
        }
    }
}

fn op_text(op: CompareOp) -> &'static str {
    match op {
        CompareOp::Equal => "==",
        CompareOp::NotEqual => "!=",
        CompareOp::Less => "<",
        CompareOp::Greater => ">",
    }
}

type Located<T> = Result<T, (usize, TxnSyntaxErrorKind)>;

/// Splits the text into tokens, each with the byte offset where it starts.
fn tokenize(source: &str) -> Located<Vec<(usize, Token)>> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        let start = index;
        let byte = bytes[index];
        let token = match byte {
            b' ' | b'\t' | b'\r' | b'\n' => {
                index += 1;
                continue;
            }
            b'#' => {
                index = source[index..].find('\n').map_or(bytes.len(), |newline| index + newline);
                continue;
            }
            b'(' => Token::LeftParen,
            b')' => Token::RightParen,
            b';' => Token::Semicolon,
            b'<' => Token::Op(CompareOp::Less),
            b'>' => Token::Op(CompareOp::Greater),
            b'=' | b'!' if bytes.get(index + 1) == Some(&b'=') => {
                index += 1;
                Token::Op(if byte == b'=' { CompareOp::Equal } else { CompareOp::NotEqual })
            }
            b'"' => {
                let (value, end) = string_literal(source, index)?;
                index = end;
                tokens.push((start, Token::Str(value)));
                continue;
            }
            b'0'..=b'9' => {
                let end = bytes[index..].iter().position(|b| !b.is_ascii_digit()).map_or(bytes.len(), |n| index + n);
                let number = source[index..end].parse().map_err(|_| (start, TxnSyntaxErrorKind::NumberTooLarge))?;
                index = end;
                tokens.push((start, Token::Number(number)));
                continue;
            }
            b if b.is_ascii_alphabetic() => {
                let end = bytes[index..]
                    .iter()
                    .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-'))
                    .map_or(bytes.len(), |n| index + n);
                let word = source[index..end].to_ascii_lowercase();
                index = end;
                tokens.push((start, Token::Word(word)));
                continue;
            }
            b'=' | b'!' => return Err((start, TxnSyntaxErrorKind::IncompleteOperator(char::from(byte)))),
            _ => {
                let unexpected = source[index..].chars().next().unwrap_or('?');
                return Err((start, TxnSyntaxErrorKind::UnexpectedChar(unexpected)));
            }
        };
        index += 1;
        tokens.push((start, token));
    }
    Ok(tokens)
}

/// Reads the string starting at the quote at `start`; returns its bytes and the offset past
/// the closing quote.
fn string_literal(source: &str, start: usize) -> Located<(Vec<u8>, usize)> {
    let bytes = source.as_bytes();
    let mut value = Vec::new();
    let mut index = start + 1;
    loop {
        match bytes.get(index) {
            None => return Err((start, TxnSyntaxErrorKind::UnterminatedString)),
            Some(b'"') => return Ok((value, index + 1)),
            Some(b'\\') => {
                let escaped = match bytes.get(index + 1) {
                    None => return Err((start, TxnSyntaxErrorKind::UnterminatedString)),
                    Some(b'"') => b'"',
                    Some(b'\\') => b'\\',
                    Some(b'n') => b'\n',
                    Some(b't') => b'\t',
                    Some(b'x') => {
                        let digits =
                            source.get(index + 2..index + 4).filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()));
                        let byte = digits.and_then(|d| u8::from_str_radix(d, 16).ok());
                        let byte = byte.ok_or((index, TxnSyntaxErrorKind::BadHexEscape))?;
                        value.push(byte);
                        index += 4;
                        continue;
                    }
                    Some(_) => {
                        let unknown = source[index + 1..].chars().next().unwrap_or('?');
                        return Err((index, TxnSyntaxErrorKind::UnknownEscape(unknown)));
                    }
                };
                value.push(escaped);
                index += 2;
            }
            Some(byte) => {
                value.push(*byte);
                index += 1;
            }
        }
    }
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    position: usize,
    /// Where "end of input" errors point.
    source_len: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.position).map(|(_, token)| token)
    }

    fn offset(&self) -> usize {
        self.tokens.get(self.position).map_or(self.source_len, |(offset, _)| *offset)
    }

    fn peek_word(&self, word: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(found)) if found == word)
    }

    fn expected<T>(&self, expected: &'static str) -> Located<T> {
        let found = self.peek().map_or("end of input".to_string(), Token::describe);
        Err((self.offset(), TxnSyntaxErrorKind::Expected { expected, found }))
    }

    fn expect(&mut self, token: Token, expected: &'static str) -> Located<()> {
        if self.peek() != Some(&token) {
            return self.expected(expected);
        }
        self.position += 1;
        Ok(())
    }

    fn string(&mut self, expected: &'static str) -> Located<Vec<u8>> {
        match self.peek() {
            Some(Token::Str(value)) => {
                let value = value.clone();
                self.position += 1;
                Ok(value)
            }
            _ => self.expected(expected),
        }
    }

    fn txn(&mut self) -> Located<TxnRequest> {
        let mut txn = TxnRequest::default();
        if self.peek_word("if") {
            self.position += 1;
            loop {
                if txn.compare.len() == MAX_TXN_COMPARES {
                    return Err((self.offset(), TxnSyntaxErrorKind::TooManyCompares { max: MAX_TXN_COMPARES }));
                }
                txn.compare.push(self.compare()?);
                if !self.peek_word("and") {
                    break;
                }
                self.position += 1;
            }
            if !self.peek_word("then") {
                return self.expected("`and` or `then`");
            }
            self.position += 1;
        } else if self.peek_word("then") {
            self.position += 1;
        }
        txn.success = self.ops()?;
        let mut else_allowed = !txn.compare.is_empty();
        if self.peek_word("else") {
            if !else_allowed {
                return Err((self.offset(), TxnSyntaxErrorKind::ElseWithoutIf));
            }
            self.position += 1;
            txn.failure = self.ops()?;
            else_allowed = false;
        }
        if self.peek().is_some() {
            return self.expected(if else_allowed { "`;`, `else` or end of input" } else { "`;` or end of input" });
        }
        Ok(txn)
    }

    fn compare(&mut self) -> Located<Compare> {
        let target = match self.peek() {
            Some(Token::Word(word))
                if matches!(word.as_str(), "value" | "version" | "create_revision" | "mod_revision") =>
            {
                word.clone()
            }
            _ => return self.expected("`value`, `version`, `create_revision` or `mod_revision`"),
        };
        self.position += 1;
        self.expect(Token::LeftParen, "`(`")?;
        let key = self.string("a quoted key")?;
        self.expect(Token::RightParen, "`)`")?;
        let op = match self.peek() {
            Some(Token::Op(op)) => *op,
            _ => return self.expected("`==`, `!=`, `<` or `>`"),
        };
        self.position += 1;
        let target = match (target.as_str(), self.peek()) {
            ("value", Some(Token::Str(value))) => CompareTarget::Value(value.clone()),
            ("value", _) => return self.expected("a quoted value (value compares against a string)"),
            (_, Some(Token::Number(number))) => match target.as_str() {
                "version" => CompareTarget::Version(*number),
                "create_revision" => CompareTarget::CreateRevision(*number),
                _ => CompareTarget::ModRevision(*number),
            },
            _ => return self.expected("a number"),
        };
        self.position += 1;
        Ok(Compare { key, op, target })
    }

    fn ops(&mut self) -> Located<Vec<TxnOp>> {
        let mut ops = Vec::new();
        while self.peek().is_some() && !self.peek_word("else") {
            if ops.len() == MAX_TXN_OPS {
                return Err((self.offset(), TxnSyntaxErrorKind::TooManyOps { max: MAX_TXN_OPS }));
            }
            ops.push(self.op()?);
            if self.peek() != Some(&Token::Semicolon) {
                break;
            }
            self.position += 1;
        }
        Ok(ops)
    }

    fn op(&mut self) -> Located<TxnOp> {
        let word = match self.peek() {
            Some(Token::Word(word)) => word.clone(),
            _ => return self.expected("an operation"),
        };
        let op = match word.as_str() {
            "put" => {
                self.position += 1;
                let key = self.string("a quoted key")?;
                let value = self.string("a quoted value")?;
                TxnOp::Put { key, value, lease: None }
            }
            "get" => {
                self.position += 1;
                TxnOp::Get { key: self.string("a quoted key")? }
            }
            "delete" => {
                self.position += 1;
                TxnOp::Delete { key: self.string("a quoted key")? }
            }
            "delete-prefix" => {
                self.position += 1;
                TxnOp::DeleteRange { range: KeyRange::prefix(self.string("a quoted prefix")?) }
            }
            _ => return self.expected("`put`, `get`, `delete` or `delete-prefix`"),
        };
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compare(key: &str, op: CompareOp, target: CompareTarget) -> Compare {
        Compare { key: key.into(), op, target }
    }

    fn put(key: &str, value: &str) -> TxnOp {
        TxnOp::Put { key: key.into(), value: value.into(), lease: None }
    }

    fn get(key: &str) -> TxnOp {
        TxnOp::Get { key: key.into() }
    }

    fn delete(key: &str) -> TxnOp {
        TxnOp::Delete { key: key.into() }
    }

    #[test]
    fn valid_texts_parse_into_the_expected_request() {
        let cases: Vec<(&str, TxnRequest)> = vec![
            (
                "if version(\"k\") == 0 and value(\"a\") != \"x\" and mod_revision(\"b\") > 5\n\
                 then put \"k\" \"v\"; get \"a\"\n\
                 else get \"k\"; delete \"b\"",
                TxnRequest {
                    compare: vec![
                        compare("k", CompareOp::Equal, CompareTarget::Version(0)),
                        compare("a", CompareOp::NotEqual, CompareTarget::Value(b"x".to_vec())),
                        compare("b", CompareOp::Greater, CompareTarget::ModRevision(5)),
                    ],
                    success: vec![put("k", "v"), get("a")],
                    failure: vec![get("k"), delete("b")],
                },
            ),
            ("put \"k\" \"v\"", TxnRequest { success: vec![put("k", "v")], ..Default::default() }),
            ("then get \"a\"; get \"b\";", TxnRequest { success: vec![get("a"), get("b")], ..Default::default() }),
            (
                "IF create_revision(\"c\") < 18446744073709551615 THEN delete-prefix \"p/\"",
                TxnRequest {
                    compare: vec![compare("c", CompareOp::Less, CompareTarget::CreateRevision(u64::MAX))],
                    success: vec![TxnOp::DeleteRange { range: KeyRange::prefix("p/") }],
                    failure: vec![],
                },
            ),
            (
                "if value(\"q\\\"uote\") == \"back\\\\slash\\n\\x00\\xff\" then else put \"k\" \"\" # comment",
                TxnRequest {
                    compare: vec![compare(
                        "q\"uote",
                        CompareOp::Equal,
                        CompareTarget::Value(b"back\\slash\n\x00\xff".to_vec()),
                    )],
                    success: vec![],
                    failure: vec![put("k", "")],
                },
            ),
            ("", TxnRequest::default()),
            ("put \"ключ\" \"значение\"", TxnRequest { success: vec![put("ключ", "значение")], ..Default::default() }),
        ];
        for (text, expected) in cases {
            assert_eq!(parse_txn(text), Ok(expected), "{text}");
        }
    }

    #[test]
    fn invalid_texts_report_what_is_wrong_and_where() {
        let expected =
            |expected: &'static str, found: &str| TxnSyntaxErrorKind::Expected { expected, found: found.to_string() };
        let cases: Vec<(&str, usize, usize, TxnSyntaxErrorKind)> = vec![
            ("put \"k", 1, 5, TxnSyntaxErrorKind::UnterminatedString),
            ("get \"a\\qb\"", 1, 7, TxnSyntaxErrorKind::UnknownEscape('q')),
            ("get \"\\x4\"", 1, 6, TxnSyntaxErrorKind::BadHexEscape),
            ("get \"a\" @", 1, 9, TxnSyntaxErrorKind::UnexpectedChar('@')),
            ("if version(\"k\") = 0 then get \"k\"", 1, 17, TxnSyntaxErrorKind::IncompleteOperator('=')),
            ("if version(\"k\") ! 0 then", 1, 17, TxnSyntaxErrorKind::IncompleteOperator('!')),
            ("if version(\"k\") == 99999999999999999999 then", 1, 20, TxnSyntaxErrorKind::NumberTooLarge),
            ("if version(\"k\") == \"0\" then", 1, 20, expected("a number", "a string")),
            (
                "if value(\"k\") == 0 then",
                1,
                18,
                expected("a quoted value (value compares against a string)", "number 0"),
            ),
            (
                "if size(\"k\") == 0 then",
                1,
                4,
                expected("`value`, `version`, `create_revision` or `mod_revision`", "`size`"),
            ),
            ("if version(k) == 0 then", 1, 12, expected("a quoted key", "`k`")),
            ("if version(\"k\") == 0\nput \"k\" \"v\"", 2, 1, expected("`and` or `then`", "`put`")),
            ("if version(\"k\") == 0 then put \"k\"", 1, 34, expected("a quoted value", "end of input")),
            ("then get \"a\" get \"b\"", 1, 14, expected("`;` or end of input", "`get`")),
            ("then copy \"a\"", 1, 6, expected("`put`, `get`, `delete` or `delete-prefix`", "`copy`")),
            ("put \"k\" \"v\" else get \"k\"", 1, 13, TxnSyntaxErrorKind::ElseWithoutIf),
            ("if version(\"k\") == 0 then get \"k\" then", 1, 35, expected("`;`, `else` or end of input", "`then`")),
            (
                "if version(\"k\") == 0 then get \"k\" else get \"k\" else",
                1,
                48,
                expected("`;` or end of input", "`else`"),
            ),
        ];
        for (text, line, column, kind) in cases {
            assert_eq!(parse_txn(text), Err(TxnSyntaxError { line, column, kind }), "{text}");
        }
    }

    #[test]
    fn branches_longer_than_the_server_limit_are_rejected_at_the_first_extra_op() {
        let ops = vec!["get \"k\""; MAX_TXN_OPS + 1].join("; ");
        let error = parse_txn(&ops).expect_err("too many ops");
        assert_eq!(error.kind, TxnSyntaxErrorKind::TooManyOps { max: MAX_TXN_OPS });
        assert_eq!(error.column, MAX_TXN_OPS * "get \"k\"; ".len() + 1);
        let compares = vec!["version(\"k\") == 0"; MAX_TXN_COMPARES + 1].join(" and ");
        let error = parse_txn(&format!("if {compares} then")).expect_err("too many compares");
        assert_eq!(error.kind, TxnSyntaxErrorKind::TooManyCompares { max: MAX_TXN_COMPARES });
    }

    #[test]
    fn excerpt_points_at_the_column() {
        let text = "if version(\"k\") == 0\nthen put \"k\"";
        let error = parse_txn(text).expect_err("missing value");
        assert_eq!(excerpt(text, &error), "  then put \"k\"\n              ^");
    }
}
