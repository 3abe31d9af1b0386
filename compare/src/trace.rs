//! The bind-trace text format, version 1: a parser that reports the line and column of the
//! first problem (and returns no events at all then), and a writer.
//!
//! The format is specified in `compare/traces/FORMAT.md`; in short:
//!
//! ```text
//! iopt-trace v1                 # first line, exactly this (a comment may follow)
//! config panthor                # optional, before any job: panthor (default) or smmu
//! submit 1 map 0x40000000 2M 0x80000000 rw
//! submit 2 unmap 0x40000000 0x200000
//! execute 1
//! complete 1
//! ```
//!
//! Numbers are decimal or `0x` hexadecimal, with optional `_` separators; sizes may end in
//! `K`, `M` or `G` (binary units). `prot` is a number (Linux `IOMMU_*` bits) or letters from
//! `r w c n m p` (read, write, cache, noexec, mmio, priv). Besides the syntax, the parser
//! checks each job's life: ids are unique, `execute` follows `submit`, `complete` follows
//! `execute`, each at most once.
//!
//! ```
//! use compare::trace::parse;
//! let w = parse("iopt-trace v1\nsubmit 1 map 0x1000 4K 0x2000 rw\nexecute 1\ncomplete 1\n", "t")?;
//! assert_eq!(w.events.len(), 3);
//! let e = parse("iopt-trace v1\nexecute 7\n", "t").unwrap_err();
//! assert_eq!((e.line, e.column), (2, 9));
//! # Ok::<(), compare::trace::TraceError>(())
//! ```

use crate::ops::{BindOp, Event, JobId, TableKind, Workload};
use std::collections::HashMap;
use std::fmt::{self, Write as _};

/// The first line of every version-1 trace.
pub const HEADER: &str = "iopt-trace v1";

/// A trace that could not be read: where, and why. Nothing of the trace was run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceError {
    /// 1-based line number.
    pub line: usize,
    /// 1-based column (in characters) where the offending token starts.
    pub column: usize,
    /// What was wrong.
    pub message: String,
    /// The offending line, as written.
    pub text: String,
}

impl fmt::Display for TraceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "line {}, column {}: {}\n  {}\n  {}^",
            self.line,
            self.column,
            self.message,
            self.text,
            " ".repeat(self.column.saturating_sub(1))
        )
    }
}

impl std::error::Error for TraceError {}

/// A token: its text and 1-based column.
#[derive(Debug, Clone, Copy)]
struct Tok<'a> {
    text: &'a str,
    col: usize,
}

/// Splits a line (comment already removed) into whitespace-separated tokens with columns.
fn tokenize(line: &str) -> Vec<Tok<'_>> {
    let mut out = Vec::new();
    let mut start: Option<(usize, usize)> = None; // (byte offset, column)
    let mut col = 0;
    for (off, ch) in line.char_indices() {
        col += 1;
        if ch.is_whitespace() {
            if let Some((s, c)) = start.take() {
                out.push(Tok {
                    text: &line[s..off],
                    col: c,
                });
            }
        } else if start.is_none() {
            start = Some((off, col));
        }
    }
    if let Some((s, c)) = start {
        out.push(Tok {
            text: &line[s..],
            col: c,
        });
    }
    out
}

/// Where a job is in its life, for the semantic checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Life {
    Submitted,
    Executed,
    Completed,
}

struct Parser<'a> {
    line_no: usize,
    line: &'a str,
    /// Column just past the line's last token (for "missing" errors).
    end_col: usize,
}

impl Parser<'_> {
    fn err(&self, column: usize, message: impl Into<String>) -> TraceError {
        TraceError {
            line: self.line_no,
            column,
            message: message.into(),
            text: self.line.to_string(),
        }
    }

    fn need<'t>(&self, toks: &[Tok<'t>], i: usize, what: &str) -> Result<Tok<'t>, TraceError> {
        toks.get(i)
            .copied()
            .ok_or_else(|| self.err(self.end_col, format!("expected {what}")))
    }

    fn number(&self, t: Tok<'_>, what: &str, units: bool) -> Result<u64, TraceError> {
        parse_number(t.text, units).map_err(|m| self.err(t.col, format!("{what}: {m}")))
    }

    fn prot(&self, t: Tok<'_>) -> Result<u32, TraceError> {
        if t.text.starts_with(|c: char| c.is_ascii_digit()) {
            let v = self.number(t, "prot", false)?;
            return u32::try_from(v).map_err(|_| self.err(t.col, "prot: does not fit in 32 bits"));
        }
        let mut bits = 0u32;
        for (i, c) in t.text.chars().enumerate() {
            let b = match c {
                'r' => 1,
                'w' => 2,
                'c' => 4,
                'n' => 8,
                'm' => 16,
                'p' => 32,
                _ => {
                    return Err(self.err(
                        t.col + i,
                        format!(
                            "prot: unknown flag {c:?} (expected a number or letters from rwcnmp)"
                        ),
                    ));
                }
            };
            bits |= b;
        }
        Ok(bits)
    }

    fn no_more(&self, toks: &[Tok<'_>], n: usize) -> Result<(), TraceError> {
        match toks.get(n) {
            Some(t) => Err(self.err(
                t.col,
                format!("unexpected {:?} after the operation", t.text),
            )),
            None => Ok(()),
        }
    }
}

/// Parses a number: decimal or `0x` hex, `_` separators allowed, and with `units` a `K`, `M`
/// or `G` suffix (times 2^10, 2^20, 2^30).
fn parse_number(text: &str, units: bool) -> Result<u64, String> {
    let (body, mult) = match text.as_bytes().last() {
        Some(b'K' | b'k') if units => (&text[..text.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') if units && !text.starts_with("0x") => (&text[..text.len() - 1], 1 << 20),
        Some(b'G' | b'g') if units && !text.starts_with("0x") => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    let clean: String = body.chars().filter(|&c| c != '_').collect();
    if clean.is_empty() {
        return Err(format!("expected a number, found {text:?}"));
    }
    let v = if let Some(hex) = clean
        .strip_prefix("0x")
        .or_else(|| clean.strip_prefix("0X"))
    {
        u64::from_str_radix(hex, 16)
    } else {
        clean.parse::<u64>()
    }
    .map_err(|e| format!("{text:?} is not a valid number ({e})"))?;
    v.checked_mul(mult)
        .ok_or_else(|| format!("{text:?} does not fit in 64 bits"))
}

/// Parses a version-1 trace. `name` becomes the workload's name.
///
/// # Errors
///
/// The first syntax or job-life error, with its line and column; no events are returned then.
#[allow(clippy::too_many_lines)] // one arm per keyword
pub fn parse(text: &str, name: &str) -> Result<Workload, TraceError> {
    let mut events = Vec::new();
    let mut table = TableKind::default();
    let mut life: HashMap<JobId, (Life, usize)> = HashMap::new();
    let mut seen_header = false;
    for (i, raw) in text.lines().enumerate() {
        let line_no = i + 1;
        let code = raw.split('#').next().unwrap_or("");
        let toks = tokenize(code);
        let p = Parser {
            line_no,
            line: raw,
            end_col: code.trim_end().chars().count() + 1,
        };
        if !seen_header {
            let words: Vec<&str> = toks.iter().map(|t| t.text).collect();
            if words != ["iopt-trace", "v1"] {
                let col = toks.first().map_or(1, |t| t.col);
                let msg = if words.first() == Some(&"iopt-trace") {
                    format!(
                        "unsupported trace version {:?} (this reader knows v1)",
                        words.get(1).copied().unwrap_or("")
                    )
                } else {
                    format!("the first line must be {HEADER:?}")
                };
                return Err(p.err(col, msg));
            }
            seen_header = true;
            continue;
        }
        let Some(&kw) = toks.first() else { continue };
        match kw.text {
            "config" => {
                if !events.is_empty() {
                    return Err(p.err(kw.col, "config must come before the first job"));
                }
                let t = p.need(&toks, 1, "a table name (panthor or smmu)")?;
                table = TableKind::from_name(t.text).ok_or_else(|| {
                    p.err(
                        t.col,
                        format!("unknown table {:?} (expected panthor or smmu)", t.text),
                    )
                })?;
                p.no_more(&toks, 2)?;
            }
            "submit" => {
                let id_tok = p.need(&toks, 1, "a job id")?;
                let id = p.number(id_tok, "job id", false)?;
                let op_tok = p.need(&toks, 2, "map or unmap")?;
                let va_tok = p.need(&toks, 3, "a virtual address")?;
                let va = p.number(va_tok, "va", false)?;
                let size_tok = p.need(&toks, 4, "a size")?;
                let size = p.number(size_tok, "size", true)?;
                if size == 0 {
                    return Err(p.err(size_tok.col, "size: must not be zero"));
                }
                let op = match op_tok.text {
                    "map" => {
                        let pa_tok = p.need(&toks, 5, "a physical address")?;
                        let pa = p.number(pa_tok, "pa", false)?;
                        let prot_tok = p.need(&toks, 6, "a prot")?;
                        let prot = p.prot(prot_tok)?;
                        p.no_more(&toks, 7)?;
                        BindOp::Map { va, size, pa, prot }
                    }
                    "unmap" => {
                        p.no_more(&toks, 5)?;
                        BindOp::Unmap { va, size }
                    }
                    other => {
                        return Err(p.err(
                            op_tok.col,
                            format!("expected map or unmap, found {other:?}"),
                        ));
                    }
                };
                if let Some((_, at)) = life.get(&id) {
                    return Err(p.err(
                        id_tok.col,
                        format!("job {id} was already submitted on line {at}"),
                    ));
                }
                life.insert(id, (Life::Submitted, line_no));
                events.push(Event::Submit { id, op });
            }
            "execute" | "complete" => {
                let id_tok = p.need(&toks, 1, "a job id")?;
                let id = p.number(id_tok, "job id", false)?;
                p.no_more(&toks, 2)?;
                let execute = kw.text == "execute";
                let (want, next) = if execute {
                    (Life::Submitted, Life::Executed)
                } else {
                    (Life::Executed, Life::Completed)
                };
                match life.get_mut(&id) {
                    None => {
                        return Err(p.err(id_tok.col, format!("job {id} was never submitted")));
                    }
                    Some((state, at)) if *state != want => {
                        let msg = match (*state, execute) {
                            (Life::Submitted, false) => {
                                format!("job {id} completes before it executes")
                            }
                            (_, true) => format!("job {id} already executed (line {at})"),
                            _ => format!("job {id} already completed (line {at})"),
                        };
                        return Err(p.err(id_tok.col, msg));
                    }
                    Some(entry) => *entry = (next, line_no),
                }
                events.push(if execute {
                    Event::Execute { id }
                } else {
                    Event::Complete { id }
                });
            }
            other => {
                return Err(p.err(
                    kw.col,
                    format!(
                        "unknown keyword {other:?} (expected submit, execute, complete or config)"
                    ),
                ));
            }
        }
    }
    if !seen_header {
        return Err(TraceError {
            line: 1,
            column: 1,
            message: format!("empty trace: the first line must be {HEADER:?}"),
            text: String::new(),
        });
    }
    Ok(Workload {
        name: name.to_string(),
        description: format!("replay of trace {name}"),
        table,
        events,
    })
}

/// Writes a workload as a version-1 trace that [`parse`] reads back to the same events.
#[must_use]
pub fn write(w: &Workload) -> String {
    let mut s = String::with_capacity(w.events.len() * 32 + 64);
    let _ = writeln!(s, "{HEADER}");
    let _ = writeln!(s, "# {}: {}", w.name, w.description);
    let _ = writeln!(s, "config {}", w.table.name());
    for e in &w.events {
        let _ = writeln!(s, "{e}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers() {
        assert_eq!(parse_number("0x1_000", true), Ok(0x1000));
        assert_eq!(parse_number("4K", true), Ok(4096));
        assert_eq!(parse_number("2M", true), Ok(2 << 20));
        assert_eq!(parse_number("1G", true), Ok(1 << 30));
        assert!(parse_number("2M", false).is_err());
        assert!(parse_number("0x", true).is_err());
        assert!(parse_number("99999999999999999999", true).is_err());
        assert!(parse_number("17179869184G", true).is_err());
    }

    #[test]
    fn tokens_have_columns() {
        let t = tokenize("  submit\t7  map");
        let cols: Vec<_> = t.iter().map(|t| (t.text, t.col)).collect();
        assert_eq!(cols, [("submit", 3), ("7", 10), ("map", 13)]);
    }
}
