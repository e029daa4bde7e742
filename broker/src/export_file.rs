//! The broker export file (`micromsg-broker export` / `import`), format version 1: JSON lines,
//! sans-IO. [`encode_header`], [`encode_row`] and [`encode_end`] make lines; a [`Decoder`] fed
//! the lines one by one gives back whole entities ([`Bundle`]s) and checks everything on the
//! way, so a damaged file is refused with its line number before anything is stored.
//!
//! ```text
//! {"format":"micromsg-broker-export","version":1,"created_at":1764972000,"broker_id":"x"}
//! {"table":"entities","row":{"created_at":1764900000,"next_device":3,"number":"5550001234"}}
//! {"table":"devices","row":{"client_secret":"q83v…","created_at":1764900000,"device_id":1,…}}
//! …
//! {"end":{"entities":1,"rows":9}}
//! ```
//!
//! An `entities` row starts an entity; the rows after it, up to the next one, are that
//! entity's (each names the entity in its owner column, which is checked). Bytes are base64
//! (standard alphabet, padded). The `end` line counts entities and row lines: a file cut
//! short has none, or the wrong counts. docs/operations.md ("Moving entities") specifies it.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Map, Value as Json, json};

use micromsg_store::portable::Bundle;
use micromsg_store::tables::{Kind, Row, Scope, Table, Value, table};

/// The `format` of the header line.
pub const FORMAT: &str = "micromsg-broker-export";
/// The format version this broker writes and the newest it reads.
pub const VERSION: u64 = 1;

/// What is wrong with an export file, and on which line (1-based).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {problem}")]
pub struct FileError {
    /// The line.
    pub line: u64,
    /// The problem.
    pub problem: Problem,
}

/// The problems a file can have.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// The first line is not an export header.
    #[error("not a MicroMsg broker export file (no {FORMAT:?} header)")]
    NotExport,
    /// A newer format than this broker reads.
    #[error("format version {0} is newer than this broker reads ({VERSION}): upgrade this broker")]
    Newer(u64),
    /// A line that is not JSON, or not one of the line shapes.
    #[error("damaged line: {0}")]
    Damaged(String),
    /// A row of a table the format does not carry.
    #[error("unknown table {0:?}")]
    UnknownTable(String),
    /// A column missing, unknown or of the wrong type.
    #[error("table {table}: {what}")]
    BadColumn {
        /// The table.
        table: &'static str,
        /// What is wrong.
        what: String,
    },
    /// A row before the first entity, or naming another entity than the one it follows.
    #[error("a {0} row that does not belong to the entity before it")]
    Misplaced(&'static str),
    /// Lines after the end line.
    #[error("lines after the end line")]
    AfterEnd,
    /// The end line's counts differ from what was read.
    #[error("the end line counts {claimed} but the file holds {found}")]
    Counts {
        /// What the end line says.
        claimed: String,
        /// What was read.
        found: String,
    },
    /// The file ends without its end line.
    #[error("the file ends without its end line: it was cut short")]
    Truncated,
}

/// The header line.
pub fn encode_header(created_at: i64, broker_id: &str) -> String {
    // Written key by key so that `format` and `version` come first, as documented (a JSON
    // object's order means nothing to a reader, but it does to a person with `head -1`).
    format!(
        r#"{{"format":{},"version":{VERSION},"created_at":{created_at},"broker_id":{}}}"#,
        json!(FORMAT),
        json!(broker_id)
    )
}

/// A row line of `table`.
pub fn encode_row(table: &Table, row: &Row) -> String {
    let mut object = Map::new();
    for (c, v) in table.columns.iter().zip(row) {
        let value = match v {
            Value::Null => Json::Null,
            Value::Int(i) => json!(i),
            Value::Bool(b) => json!(b),
            Value::Text(s) => json!(s),
            Value::Blob(b) => json!(STANDARD.encode(b)),
        };
        object.insert(c.name.to_owned(), value);
    }
    // `table` first, as documented (see `encode_header`).
    format!(
        r#"{{"table":{},"row":{}}}"#,
        json!(table.name),
        Json::Object(object)
    )
}

/// The end line.
pub fn encode_end(entities: u64, rows: u64) -> String {
    json!({"end": {"entities": entities, "rows": rows}}).to_string()
}

/// Every row line of `bundle`, `entities` first.
pub fn encode_bundle(bundle: &Bundle) -> Vec<String> {
    let mut lines = Vec::with_capacity(bundle.rows());
    let mut tables: Vec<_> = bundle.tables.iter().collect();
    tables.sort_by_key(|(t, _)| t.name != "entities");
    for (t, rows) in tables {
        for row in rows {
            lines.push(encode_row(t, row));
        }
    }
    lines
}

/// Reads an export file line by line.
#[derive(Debug, Default)]
pub struct Decoder {
    line: u64,
    header: bool,
    ended: bool,
    current: Option<Bundle>,
    entities: u64,
    rows: u64,
}

impl Decoder {
    /// A decoder before the header.
    pub fn new() -> Self {
        Self::default()
    }

    /// Takes the next line; gives back the entity it completes, if it completes one (the
    /// next entity's first line, or the end line, completes the one before).
    pub fn line(&mut self, text: &str) -> Result<Option<Bundle>, FileError> {
        self.line += 1;
        let line = self.line;
        self.take(text)
            .map_err(|problem| FileError { line, problem })
    }

    /// After the last line: the file must have ended with its end line.
    pub fn finish(self) -> Result<(), FileError> {
        if self.ended {
            Ok(())
        } else {
            Err(FileError {
                line: self.line,
                problem: if self.header {
                    Problem::Truncated
                } else {
                    Problem::NotExport
                },
            })
        }
    }

    fn take(&mut self, text: &str) -> Result<Option<Bundle>, Problem> {
        if self.ended {
            return if text.trim().is_empty() {
                Ok(None)
            } else {
                Err(Problem::AfterEnd)
            };
        }
        let json: Json = serde_json::from_str(text).map_err(|e| {
            if self.header {
                Problem::Damaged(e.to_string())
            } else {
                Problem::NotExport
            }
        })?;
        if !self.header {
            if json.get("format").and_then(Json::as_str) != Some(FORMAT) {
                return Err(Problem::NotExport);
            }
            let version = json
                .get("version")
                .and_then(Json::as_u64)
                .ok_or(Problem::NotExport)?;
            if version > VERSION {
                return Err(Problem::Newer(version));
            }
            self.header = true;
            return Ok(None);
        }
        if let Some(end) = json.get("end") {
            let count = |k: &str| end.get(k).and_then(Json::as_u64);
            let (Some(entities), Some(rows)) = (count("entities"), count("rows")) else {
                return Err(Problem::Damaged("an end line without its counts".into()));
            };
            if (entities, rows) != (self.entities, self.rows) {
                return Err(Problem::Counts {
                    claimed: format!("{entities} entities and {rows} rows"),
                    found: format!("{} entities and {} rows", self.entities, self.rows),
                });
            }
            self.ended = true;
            return Ok(self.current.take());
        }
        let name = json
            .get("table")
            .and_then(Json::as_str)
            .ok_or_else(|| Problem::Damaged("neither a row nor the end line".into()))?;
        let spec = table(name)
            .filter(|t| matches!(t.scope, Scope::Entity(_) | Scope::ItemAcks))
            .ok_or_else(|| Problem::UnknownTable(name.to_owned()))?;
        let row = decode_row(spec, json.get("row"))?;
        self.rows += 1;
        if spec.name == "entities" {
            let number = row
                .first()
                .and_then(Value::as_text)
                .ok_or(Problem::Misplaced("entities"))?
                .to_owned();
            self.entities += 1;
            let done = self.current.replace(Bundle {
                number,
                tables: vec![(spec, vec![row])],
            });
            return Ok(done);
        }
        let bundle = self.current.as_mut().ok_or(Problem::Misplaced(spec.name))?;
        if let Scope::Entity(owner) = spec.scope {
            let at = spec.column(owner).ok_or(Problem::Misplaced(spec.name))?;
            if row[at].as_text() != Some(bundle.number.as_str()) {
                return Err(Problem::Misplaced(spec.name));
            }
        }
        match bundle.tables.iter_mut().find(|(t, _)| t.name == spec.name) {
            Some((_, rows)) => rows.push(row),
            None => bundle.tables.push((spec, vec![row])),
        }
        Ok(None)
    }
}

/// A row object of `table`: every column present, of its type, and nothing else.
fn decode_row(table: &'static Table, row: Option<&Json>) -> Result<Row, Problem> {
    let bad = |what: String| Problem::BadColumn {
        table: table.name,
        what,
    };
    let object = row
        .and_then(Json::as_object)
        .ok_or_else(|| bad("no row object".into()))?;
    if let Some(extra) = object.keys().find(|k| table.column(k.as_str()).is_none()) {
        return Err(bad(format!("unknown column {extra:?}")));
    }
    let mut out = Vec::with_capacity(table.columns.len());
    for c in table.columns {
        let v = object
            .get(c.name)
            .ok_or_else(|| bad(format!("column {} is missing", c.name)))?;
        let value = match (v, c.kind) {
            (Json::Null, _) => Value::Null,
            (Json::Number(n), Kind::Int) => Value::Int(
                n.as_i64()
                    .ok_or_else(|| bad(format!("column {}: not a 64-bit integer", c.name)))?,
            ),
            (Json::Bool(b), Kind::Bool) => Value::Bool(*b),
            (Json::String(s), Kind::Text) => Value::Text(s.clone()),
            (Json::String(s), Kind::Blob) => Value::Blob(
                STANDARD
                    .decode(s)
                    .map_err(|_| bad(format!("column {}: not base64", c.name)))?,
            ),
            _ => return Err(bad(format!("column {}: not of type {:?}", c.name, c.kind))),
        };
        out.push(value);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn bundle() -> Bundle {
        let entities = table("entities").unwrap();
        let devices = table("devices").unwrap();
        Bundle {
            number: "5550001234".into(),
            tables: vec![
                (
                    entities,
                    vec![vec![
                        Value::Text("5550001234".into()),
                        Value::Int(1_700_000_000),
                        Value::Int(2),
                    ]],
                ),
                (
                    devices,
                    vec![vec![
                        Value::Text("5550001234".into()),
                        Value::Int(1),
                        Value::Null,
                        Value::Blob(vec![1; 32]),
                        Value::Blob(vec![2; 32]),
                        Value::Int(1_700_000_000),
                        Value::Null,
                        Value::Null,
                        Value::Int(7),
                    ]],
                ),
            ],
        }
    }

    fn file(b: &Bundle) -> Vec<String> {
        let mut lines = vec![encode_header(1, "x")];
        lines.extend(encode_bundle(b));
        lines.push(encode_end(1, b.rows() as u64));
        lines
    }

    fn decode(lines: &[String]) -> Result<Vec<Bundle>, FileError> {
        let mut d = Decoder::new();
        let mut out = Vec::new();
        for l in lines {
            out.extend(d.line(l)?);
        }
        d.finish()?;
        Ok(out)
    }

    #[test]
    fn a_bundle_round_trips() {
        let b = bundle();
        let back = decode(&file(&b)).unwrap();
        assert_eq!(back.len(), 1);
        assert_eq!(back[0].number, b.number);
        assert_eq!(back[0].rows_of("devices"), b.rows_of("devices"));
        assert_eq!(back[0].rows_of("entities"), b.rows_of("entities"));
    }

    #[test]
    fn the_lines_are_as_documented() {
        assert_eq!(
            encode_header(1_764_972_000, "x"),
            r#"{"format":"micromsg-broker-export","version":1,"created_at":1764972000,"broker_id":"x"}"#
        );
        let lines = encode_bundle(&bundle());
        assert_eq!(
            lines[0],
            r#"{"table":"entities","row":{"created_at":1700000000,"next_device":2,"number":"5550001234"}}"#
        );
        assert!(
            lines[1].starts_with(
                r#"{"table":"devices","row":{"client_secret":"AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE=","#
            ),
            "{}",
            lines[1]
        );
        assert_eq!(encode_end(3, 40), r#"{"end":{"entities":3,"rows":40}}"#);
    }

    #[test]
    fn a_newer_version_is_refused() {
        let mut lines = file(&bundle());
        lines[0] = lines[0].replace("\"version\":1", "\"version\":2");
        assert_eq!(
            decode(&lines).unwrap_err(),
            FileError {
                line: 1,
                problem: Problem::Newer(2)
            }
        );
    }

    #[test]
    fn damage_is_refused_with_its_line() {
        let good = file(&bundle());
        let mut cut = good.clone();
        cut[2].truncate(20);
        assert!(matches!(
            decode(&cut).unwrap_err(),
            FileError {
                line: 3,
                problem: Problem::Damaged(_)
            }
        ));
        let mut bad_secret = good.clone();
        bad_secret[2] = bad_secret[2].replace("AQEB", "!!!!");
        assert!(matches!(
            decode(&bad_secret).unwrap_err(),
            FileError {
                line: 3,
                problem: Problem::BadColumn { .. }
            }
        ));
        let mut other = good.clone();
        other[2] = other[2].replace("5550001234", "5550009999");
        assert_eq!(
            decode(&other).unwrap_err().problem,
            Problem::Misplaced("devices")
        );
        let truncated = &good[..good.len() - 1];
        assert_eq!(decode(truncated).unwrap_err().problem, Problem::Truncated);
        let mut miscounted = good.clone();
        *miscounted.last_mut().unwrap() = encode_end(1, 5);
        assert!(matches!(
            decode(&miscounted).unwrap_err().problem,
            Problem::Counts { .. }
        ));
        let mut later = good;
        later.push(encode_row(
            table("entities").unwrap(),
            &bundle().rows_of("entities")[0],
        ));
        assert_eq!(decode(&later).unwrap_err().problem, Problem::AfterEnd);
        assert_eq!(
            decode(&["hello".to_owned()]).unwrap_err().problem,
            Problem::NotExport
        );
        let unknown = vec![
            encode_header(1, "x"),
            r#"{"table":"outbox","row":{}}"#.to_owned(),
        ];
        assert_eq!(
            decode(&unknown).unwrap_err().problem,
            Problem::UnknownTable("outbox".into())
        );
    }
}
