//! Where in the text a problem is, for messages: `line L, column C: …`.

use std::collections::BTreeMap;
use std::ops::Range;

use serde::Deserialize;
use toml::Spanned;

use super::BackendConfig;

/// The backend tables with the spans of their keys, parsed leniently (any values).
#[derive(Deserialize)]
struct Spans {
    #[serde(default)]
    backends: BTreeMap<String, Spanned<BTreeMap<Spanned<String>, toml::Value>>>,
}

fn spans(text: &str) -> Option<Spans> {
    toml::from_str(text).ok()
}

/// `line L, column C: message`, or the message alone if the place is unknown.
pub(super) fn message(text: &str, at: Option<Range<usize>>, message: &str) -> String {
    match at.and_then(|span| line_col(text, span.start)) {
        Some((line, column)) => format!("line {line}, column {column}: {message}"),
        None => message.to_owned(),
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> Option<(usize, usize)> {
    let before = text.get(..offset)?;
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    Some((line, column))
}

/// The span of `key` in the table of backend `backend`, else of the table itself.
pub(super) fn key_span(text: &str, backend: &str, key: Option<&str>) -> Option<Range<usize>> {
    let spans = spans(text)?;
    let table = spans.backends.get(backend)?;
    let key_span = key.and_then(|key| {
        table
            .get_ref()
            .keys()
            .find(|k| k.get_ref() == key)
            .map(Spanned::span)
    });
    Some(key_span.unwrap_or_else(|| table.span()))
}

/// A deserialization error inside a backend table is reported by toml at the table (serde
/// reads tagged enums into a buffer first, losing the keys' places): find the one key whose
/// removal makes the error go away, and point there. Anything else keeps toml's span.
pub(super) fn culprit(text: &str, span: Range<usize>, message: &str) -> Range<usize> {
    let Some(spans) = spans(text) else {
        return span;
    };
    let inside = spans.backends.values().find(|table| {
        let t = table.span();
        t.start <= span.start && span.start < t.end.max(t.start + 1)
    });
    let Some(table) = inside else {
        return span;
    };
    let as_table = |skip: Option<&str>| -> toml::Table {
        table
            .get_ref()
            .iter()
            .filter(|(k, _)| Some(k.get_ref().as_str()) != skip)
            .map(|(k, v)| (k.get_ref().clone(), v.clone()))
            .collect()
    };
    let error_of = |t: toml::Table| {
        BackendConfig::deserialize(toml::Value::Table(t))
            .err()
            .map(|e| e.message().to_owned())
    };
    // Only if the table alone gives the same error is the search about this error.
    if error_of(as_table(None)).as_deref() != Some(message) {
        return span;
    }
    // Serde reports a key's own error (unknown, wrong type) while reading the keys, before
    // it checks for missing ones: removing an innocent key leaves the error as it was, except
    // `type`, whose removal changes every error (so it is tried last).
    let mut keys: Vec<&Spanned<String>> = table.get_ref().keys().collect();
    keys.sort_by_key(|k| k.get_ref() == "type");
    keys.into_iter()
        .find(|k| error_of(as_table(Some(k.get_ref()))).as_deref() != Some(message))
        .map_or(span, Spanned::span)
}
