//! docs/openapi.json against a real `keyhold serve` on a temporary socket: every documented
//! operation answers its example with its documented status and a body its documented schema
//! accepts; refusals (a key of another namespace, malformed, unknown and missing fields, a wrong
//! content type, an operation not granted, a wrong token, a body too large, a method a path does
//! not take) are `Error`s with statuses the operation documents; and the document names exactly
//! the routes and key actions the source has (src/service/routes.rs, routes/admin.rs,
//! routes/batch.rs,
//! src/service/ops.rs), with the fields of the structs the bodies and queries are read into.
#![cfg(feature = "serve")]
#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod support;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{json, Map, Value};
use support::env::assert_ok;
use support::serve::{client, env, Answer, Server};

const DOC: &str = include_str!("../docs/openapi.json");
const ROUTES: &str = concat!(
    include_str!("../src/service/routes.rs"),
    include_str!("../src/service/routes/admin.rs"),
    include_str!("../src/service/routes/batch.rs")
);
const OPS: &str = include_str!("../src/service/ops.rs");

/// The HTTP methods an OpenAPI path item may hold.
const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

fn doc() -> Value {
    serde_json::from_str(DOC).expect("docs/openapi.json is JSON")
}

// ---------------------------------------------------------------------------------------------
// A validator for the subset of JSON Schema (2020-12, as OpenAPI 3.1 uses it) that the document
// is kept to: any other keyword fails the test, so the document cannot use one unchecked.

/// Keywords that say something about a value.
const CHECKED: [&str; 10] = [
    "$ref",
    "type",
    "enum",
    "properties",
    "required",
    "additionalProperties",
    "unevaluatedProperties",
    "items",
    "oneOf",
    "allOf",
];
/// Keywords that only explain.
const ANNOTATIONS: [&str; 3] = ["description", "example", "title"];

struct Validator<'d> {
    doc: &'d Value,
}

impl<'d> Validator<'d> {
    /// The value at a local reference (`#/components/schemas/Key`).
    fn pointer(&self, reference: &str) -> &'d Value {
        let pointer = reference
            .strip_prefix('#')
            .unwrap_or_else(|| panic!("only local references: `{reference}`"));
        self.doc
            .pointer(pointer)
            .unwrap_or_else(|| panic!("`{reference}` points at nothing"))
    }

    /// `schema`, or what its `$ref` (followed through) points at.
    fn resolve(&self, mut schema: &'d Value) -> &'d Value {
        while let Some(reference) = schema.get("$ref").and_then(Value::as_str) {
            schema = self.pointer(reference);
        }
        schema
    }

    /// Whether `value` is what `schema` says: the first difference, at `at`, if not.
    fn check(&self, schema: &'d Value, value: &Value, at: &str) -> Result<(), String> {
        let rules = schema
            .as_object()
            .unwrap_or_else(|| panic!("a schema is an object: {schema}"));
        for keyword in rules.keys() {
            assert!(
                CHECKED.contains(&keyword.as_str()) || ANNOTATIONS.contains(&keyword.as_str()),
                "keyword `{keyword}` is outside the subset tests/serve_openapi.rs checks: {schema}"
            );
        }
        if let Some(reference) = rules.get("$ref").and_then(Value::as_str) {
            self.check(self.pointer(reference), value, at)?;
        }
        if let Some(types) = rules.get("type") {
            let types: Vec<&str> = match types {
                Value::String(t) => vec![t.as_str()],
                Value::Array(ts) => ts.iter().map(|t| t.as_str().unwrap()).collect(),
                other => panic!("`type` is a name or a list of names: {other}"),
            };
            if !types.iter().any(|t| is_type(value, t)) {
                return Err(format!("{at}: {value} is not of type {types:?}"));
            }
        }
        if let Some(allowed) = rules.get("enum").and_then(Value::as_array) {
            if !allowed.contains(value) {
                return Err(format!("{at}: {value} is not one of {allowed:?}"));
            }
        }
        for branch in rules
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            self.check(branch, value, at)?;
        }
        if let Some(branches) = rules.get("oneOf").and_then(Value::as_array) {
            let outcomes: Vec<Result<(), String>> = branches
                .iter()
                .map(|branch| self.check(branch, value, at))
                .collect();
            let matched = outcomes.iter().filter(|o| o.is_ok()).count();
            if matched != 1 {
                let why: Vec<String> = outcomes.into_iter().filter_map(Result::err).collect();
                return Err(format!(
                    "{at}: {value} matches {matched} of oneOf's {} branches ({why:?})",
                    branches.len()
                ));
            }
        }
        if let Value::Object(fields) = value {
            self.check_object(rules, fields, at)?;
        }
        if let (Value::Array(items), Some(item)) = (value, rules.get("items")) {
            for (i, v) in items.iter().enumerate() {
                self.check(item, v, &format!("{at}[{i}]"))?;
            }
        }
        Ok(())
    }

    fn check_object(
        &self,
        rules: &'d Map<String, Value>,
        fields: &Map<String, Value>,
        at: &str,
    ) -> Result<(), String> {
        let empty = Map::new();
        let properties = rules
            .get("properties")
            .and_then(Value::as_object)
            .unwrap_or(&empty);
        for name in rules
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let name = name.as_str().unwrap();
            if !fields.contains_key(name) {
                return Err(format!("{at}: `{name}` is required and missing"));
            }
        }
        for (name, v) in fields {
            let here = format!("{at}.{name}");
            match (properties.get(name), rules.get("additionalProperties")) {
                (Some(schema), _) => self.check(schema, v, &here)?,
                (None, Some(Value::Bool(false))) => {
                    return Err(format!("{here}: no such property"))
                }
                (None, Some(schema @ Value::Object(_))) => self.check(schema, v, &here)?,
                (None, _) => {}
            }
        }
        if rules.get("unevaluatedProperties") == Some(&Value::Bool(false)) {
            let declared = self.declared(rules);
            if let Some(name) = fields.keys().find(|n| !declared.contains(*n)) {
                return Err(format!("{at}.{name}: no such property"));
            }
        }
        Ok(())
    }

    /// The properties `rules` and its `allOf` branches (through references) name: what
    /// `unevaluatedProperties: false` allows in this subset.
    fn declared(&self, rules: &'d Map<String, Value>) -> BTreeSet<String> {
        let mut names: BTreeSet<String> = rules
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|p| p.keys().cloned())
            .collect();
        for branch in rules
            .get("allOf")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if let Some(branch) = self.resolve(branch).as_object() {
                names.extend(self.declared(branch));
            }
        }
        names
    }
}

fn is_type(value: &Value, name: &str) -> bool {
    match name {
        "null" => value.is_null(),
        "boolean" => value.is_boolean(),
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        other => panic!("no JSON Schema type `{other}`"),
    }
}

#[test]
fn the_validator_refuses_what_it_should() {
    let doc = json!({"components": {"schemas": {
        "Use": {"type": "object", "properties": {"version": {"type": "integer"}},
                "required": ["version"]},
        "Signed": {"allOf": [{"$ref": "#/components/schemas/Use"}],
                   "properties": {"signature": {"type": "string"}}, "required": ["signature"],
                   "unevaluatedProperties": false},
        "Either": {"oneOf": [{"type": "string"}, {"type": ["integer", "null"]}]},
        "Closed": {"type": "object", "properties": {"a": {"enum": [1]}},
                   "additionalProperties": false},
        "List": {"type": "array", "items": {"$ref": "#/components/schemas/Closed"}}
    }}});
    let v = Validator { doc: &doc };
    let check = |name: &str, value: Value| {
        v.check(
            &json!({"$ref": format!("#/components/schemas/{name}")}),
            &value,
            "$",
        )
    };
    assert!(check("Signed", json!({"version": 1, "signature": "s"})).is_ok());
    assert!(check("Signed", json!({"version": 1})).is_err(), "required");
    assert!(check("Signed", json!({"version": "1", "signature": "s"})).is_err());
    assert!(check("Signed", json!({"version": 1, "signature": "s", "x": 1})).is_err());
    assert!(check("Either", json!(null)).is_ok());
    assert!(check("Either", json!(1.5)).is_err(), "no branch");
    assert!(check("List", json!([{"a": 1}, {}])).is_ok());
    assert!(check("List", json!([{"a": 2}])).is_err(), "enum");
    assert!(
        check("List", json!([{"b": 1}])).is_err(),
        "additionalProperties"
    );
    assert!(check("List", json!({})).is_err(), "type");
}

// ---------------------------------------------------------------------------------------------
// What the source says the service serves.

/// Every (METHOD, path) the router serves, read from src/service/routes.rs: each
/// `.route("PATH", get(h).post(h))` line; a `{what}` path is expanded by what its handler takes
/// (the key actions of src/service/ops.rs for a handler that parses an `Action`, else the string
/// arms of its `match`).
fn routes_in_source() -> BTreeSet<(String, String)> {
    let mut served = BTreeSet::new();
    for line in ROUTES.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix(".route(\"") else {
            continue;
        };
        let (path, handlers) = rest.split_once('"').unwrap();
        let calls = calls(handlers);
        assert!(
            !calls.is_empty(),
            "no method on the line of route `{path}`: keep each `.route(…)` on one line"
        );
        for (method, handler) in calls {
            let method = match method.as_str() {
                "get" | "post" | "put" | "patch" | "delete" => method.to_uppercase(),
                other => panic!("route `{path}`: unknown method router `{other}`"),
            };
            match path.strip_suffix("/{what}") {
                None => {
                    assert!(
                        !path.contains('{') || path.ends_with("{id}"),
                        "route `{path}`: teach this test its parameters"
                    );
                    served.insert((method, path.to_owned()));
                }
                Some(base) => {
                    for what in handler_takes(&handler) {
                        served.insert((method.clone(), format!("{base}/{what}")));
                    }
                }
            }
        }
    }
    served
}

/// `get(list).post(create)`: `[("get", "list"), ("post", "create")]`.
fn calls(text: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('(') {
        let name: String = rest[..open]
            .chars()
            .rev()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        let close = open + rest[open..].find(')').unwrap();
        if !name.is_empty() {
            found.push((name, rest[open + 1..close].trim().to_owned()));
        }
        rest = &rest[close + 1..];
    }
    found
}

/// The last path segments the handler `name` (in routes.rs) takes.
fn handler_takes(name: &str) -> Vec<String> {
    let start = ROUTES
        .find(&format!("async fn {name}("))
        .unwrap_or_else(|| panic!("no handler `{name}` in routes.rs"));
    let body = &ROUTES[start..start + ROUTES[start..].find("\n}\n").unwrap()];
    if body.contains("Action::parse") {
        return action_names();
    }
    let arms: Vec<String> = body
        .lines()
        .map(str::trim)
        .filter_map(|l| l.strip_prefix('"')?.split_once("\" =>"))
        .map(|(what, _)| what.to_owned())
        .collect();
    assert!(!arms.is_empty(), "handler `{name}` matches no names");
    arms
}

/// The key actions' names, from `Action::name` in src/service/ops.rs.
fn action_names() -> Vec<String> {
    let start = OPS
        .find("pub fn name(self) -> &'static str {")
        .expect("ops.rs has `Action::name`");
    let body = &OPS[start..start + OPS[start..].find("\n    }\n").unwrap()];
    let names: Vec<String> = body
        .lines()
        .filter_map(|l| l.split_once("=> \"")?.1.split_once('"'))
        .map(|(name, _)| name.to_owned())
        .collect();
    let all = OPS
        .split_once("const ALL: [Action; ")
        .and_then(|(_, rest)| rest.split_once(']'))
        .and_then(|(n, _)| n.parse::<usize>().ok())
        .expect("ops.rs has `Action::ALL`");
    assert_eq!(
        names.len(),
        all,
        "names read from `Action::name`: {names:?}"
    );
    names
}

/// The fields of `struct NAME` in routes.rs or ops.rs: name (as serde reads it) → required; and
/// whether it refuses unknown fields.
fn struct_fields(name: &str) -> (BTreeMap<String, bool>, bool) {
    let (source, start) = [ROUTES, OPS]
        .into_iter()
        .find_map(|s| {
            [" {", "<"]
                .iter()
                .find_map(|after| s.find(&format!("struct {name}{after}")))
                .map(|at| (s, at))
        })
        .unwrap_or_else(|| panic!("no `struct {name}` in routes.rs or ops.rs"));
    let line_start = source[..start].rfind('\n').unwrap();
    let before: Vec<&str> = source[..line_start]
        .lines()
        .rev()
        .map(str::trim)
        .take_while(|l| l.starts_with("#[") || l.starts_with("///"))
        .collect();
    let deny = before.iter().any(|l| l.contains("deny_unknown_fields"));
    let body = &source[start..];
    let body = &body[body.find('{').unwrap() + 1..];
    let mut fields = BTreeMap::new();
    let mut attributes = String::new();
    for line in body.lines().map(str::trim) {
        if line == "}" {
            break;
        }
        if line.starts_with("//") {
            continue;
        }
        if line.starts_with("#[") {
            attributes.push_str(line);
            continue;
        }
        let Some((field, ty)) = line.trim_start_matches("pub ").split_once(": ") else {
            continue;
        };
        let serde_name = attributes
            .split_once("rename = \"")
            .and_then(|(_, r)| r.split_once('"'))
            .map_or(field, |(r, _)| r);
        let optional = attributes.contains("default") || ty.starts_with("Option<");
        fields.insert(serde_name.to_owned(), !optional);
        attributes.clear();
    }
    // A struct of no field is written `struct NAME {}`.
    assert!(
        !fields.is_empty() || body.starts_with('}'),
        "read no field of `struct {name}`"
    );
    (fields, deny)
}

// ---------------------------------------------------------------------------------------------
// The document, read.

/// One documented operation.
struct Operation<'d> {
    method: String,
    path: String,
    spec: &'d Value,
}

impl<'d> Operation<'d> {
    fn id(&self) -> String {
        format!("{} {}", self.method, self.path)
    }

    fn test(&self) -> &'d Value {
        self.spec
            .get("x-keyhold-test")
            .unwrap_or_else(|| panic!("{}: no x-keyhold-test", self.id()))
    }

    fn grant(&self) -> Option<&'d str> {
        self.spec.get("x-keyhold-grant").and_then(Value::as_str)
    }

    /// The request body's schema and example, if it takes one.
    fn body(&self) -> Option<(&'d Value, &'d Value)> {
        let media = self
            .spec
            .pointer("/requestBody/content/application~1json")?;
        Some((&media["schema"], &media["example"]))
    }

    /// The documented answer of `status`, resolved.
    fn response(&self, v: &Validator<'d>, status: u16) -> Option<&'d Value> {
        self.spec
            .pointer(&format!("/responses/{status}"))
            .map(|r| v.resolve(r))
    }
}

fn operations(doc: &Value) -> Vec<Operation<'_>> {
    let mut all = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, spec) in item.as_object().unwrap() {
            assert!(
                METHODS.contains(&method.as_str()),
                "{path}: `{method}` is not a method this test knows"
            );
            all.push(Operation {
                method: method.to_uppercase(),
                path: path.clone(),
                spec,
            });
        }
    }
    all
}

/// Sets the field at `dotted` (`operations.0.key`) of `body` to `value`.
fn set(body: &mut Value, dotted: &str, value: Value) {
    let mut at = body;
    for part in dotted.split('.') {
        at = match part.parse::<usize>() {
            Ok(i) => &mut at[i],
            Err(_) => &mut at[part],
        };
    }
    *at = value;
}

// ---------------------------------------------------------------------------------------------
// The tests.

/// The document's routes are the router's, its key actions `Action`'s, and each body and query
/// schema has the fields of the struct the service reads it into, required as there.
#[test]
fn the_document_names_every_route_and_field_the_source_has() {
    let doc = doc();
    assert_eq!(doc["openapi"], "3.1.0");
    let ops = operations(&doc);
    let documented: BTreeSet<(String, String)> = ops
        .iter()
        .map(|o| (o.method.clone(), o.path.clone()))
        .collect();
    let served = routes_in_source();
    assert!(served.len() > 20, "read too few routes: {served:?}");
    assert_eq!(
        documented.difference(&served).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "documented in docs/openapi.json, not routed in src/service/routes.rs"
    );
    assert_eq!(
        served.difference(&documented).collect::<Vec<_>>(),
        Vec::<&(String, String)>::new(),
        "routed in src/service/routes.rs, not documented in docs/openapi.json"
    );
    let ids: BTreeSet<&str> = ops
        .iter()
        .map(|o| o.spec["operationId"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), ops.len(), "operationIds are unique");

    // A batch's `op` is a key action.
    let batch_ops: Vec<String> = serde_json::from_value(
        doc.pointer(
            "/components/schemas/BatchRequest/properties/operations/items/properties/op/enum",
        )
        .unwrap()
        .clone(),
    )
    .unwrap();
    assert_eq!(batch_ops, action_names());

    let v = Validator { doc: &doc };
    for op in &ops {
        let test = op.test();
        match (op.body(), test.get("body_struct").and_then(Value::as_str)) {
            (Some((schema, _)), Some(name)) => {
                let schema = v.resolve(schema);
                let (fields, deny) = struct_fields(name);
                let properties: BTreeSet<&String> =
                    schema["properties"].as_object().unwrap().keys().collect();
                let required: BTreeSet<&str> = schema["required"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap())
                    .collect();
                assert_eq!(
                    properties,
                    fields.keys().collect(),
                    "{}: the body's properties against `struct {name}`",
                    op.id()
                );
                assert_eq!(
                    required,
                    fields
                        .iter()
                        .filter(|(_, r)| **r)
                        .map(|(f, _)| f.as_str())
                        .collect(),
                    "{}: the body's required fields against `struct {name}`",
                    op.id()
                );
                assert_eq!(
                    schema.get("additionalProperties") == Some(&Value::Bool(false)),
                    deny,
                    "{}: additionalProperties false as `deny_unknown_fields`",
                    op.id()
                );
            }
            (None, None) => {}
            (body, name) => panic!(
                "{}: a body ({}) needs its body_struct ({name:?}), and only a body",
                op.id(),
                body.is_some()
            ),
        }
        let query: BTreeMap<String, bool> = op.spec["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| v.resolve(p))
            .filter(|p| p["in"] == "query")
            .map(|p| {
                (
                    p["name"].as_str().unwrap().to_owned(),
                    p["required"] == true,
                )
            })
            .collect();
        match test.get("query_struct").and_then(Value::as_str) {
            Some(name) => assert_eq!(query, struct_fields(name).0, "{}: query", op.id()),
            None => assert!(
                query.is_empty(),
                "{}: a query needs its query_struct",
                op.id()
            ),
        }
    }
}

/// Every documented operation, asked with its example, answers its documented success status
/// with a body its documented schema accepts; its refusals are `Error`s of documented statuses.
#[test]
fn the_server_answers_as_the_document_says() {
    let doc = doc();
    let v = Validator { doc: &doc };
    let ops = operations(&doc);
    let grants: Vec<String> = serde_json::from_value(
        doc.pointer("/components/schemas/Operation/enum")
            .unwrap()
            .clone(),
    )
    .unwrap();
    let env = env();
    let theirs = env.create_key("theirs", "ecdsa-p256", &["--namespace", "other"]);
    let quoted: Vec<String> = grants.iter().map(|g| format!("\"{g}\"")).collect();
    let server = Server::start(
        &env,
        &client("\"app\"", &format!("operations = [{}]", quoted.join(", "))),
    );
    let error = json!({"$ref": "#/components/schemas/Error"});
    let mut failures: Vec<String> = Vec::new();

    // An answer of `op`: its status must be `expected` (if given) and documented, its body what
    // the documentation of that status says.
    let judge = |op: &Operation<'_>, what: &str, answer: &Answer, expected: Option<u16>| {
        let mut wrong = Vec::new();
        if let Some(expected) = expected {
            if answer.status != expected {
                wrong.push(format!(
                    "{} ({what}): status {} (expected {expected}): {}",
                    op.id(),
                    answer.status,
                    answer.text
                ));
                return wrong;
            }
        }
        let Some(documented) = op.response(&v, answer.status) else {
            wrong.push(format!(
                "{} ({what}): status {} is not documented: {}",
                op.id(),
                answer.status,
                answer.text
            ));
            return wrong;
        };
        let content = documented["content"].as_object().unwrap();
        let content_type = answer.header("content-type").unwrap_or("");
        let (media, spec) = content.iter().next().unwrap();
        if !content_type.starts_with(media.as_str()) {
            wrong.push(format!(
                "{} ({what}): Content-Type `{content_type}`, documented `{media}`",
                op.id()
            ));
        }
        let body = if media == "application/json" {
            answer.body.clone()
        } else {
            Value::String(answer.text.clone())
        };
        if let Err(e) = v.check(&spec["schema"], &body, "$") {
            wrong.push(format!("{} ({what}): {e}", op.id()));
        }
        if answer.status >= 400 {
            if let Err(e) = v.check(&error, &body, "$") {
                wrong.push(format!("{} ({what}): not an Error: {e}", op.id()));
            }
        }
        wrong
    };

    // Each operation with its example, on a fresh fixture key.
    let mut fixtures: BTreeMap<String, String> = BTreeMap::new();
    for (n, op) in ops.iter().enumerate() {
        let test = op.test();
        let mut answers: BTreeMap<String, Value> = BTreeMap::new();
        let mut path = op.path.clone();
        if let Some(fixture) = test.get("fixture").and_then(Value::as_str) {
            let mut create =
                json!({"namespace": "app", "name": format!("fixture-{n}"), "type": fixture});
            // What else the fixture is made with (an exportable key, for `export`).
            for (field, value) in test
                .get("fixture_body")
                .and_then(Value::as_object)
                .into_iter()
                .flatten()
            {
                create[field] = value.clone();
            }
            let (status, key) = server.ask("POST", "/v1/keys", Some(&create));
            assert_eq!(status, 201, "{}: its fixture: {key}", op.id());
            let id = key["id"].as_str().unwrap().to_owned();
            path = path.replace("{id}", &id);
            fixtures.insert(op.id(), id);
            answers.insert("key".into(), key);
        }
        for step in test["before"].as_array().into_iter().flatten() {
            let action = step["action"].as_str().unwrap();
            let (status, answer) = server.ask(
                "POST",
                &format!("/v1/keys/{}/{action}", fixtures[&op.id()]),
                Some(&step["body"]),
            );
            assert_eq!(status, 200, "{}: before, {action}: {answer}", op.id());
            answers.insert(action.to_owned(), answer);
        }
        let body = op.body().map(|(schema, example)| {
            if let Err(e) = v.check(schema, example, "example") {
                failures.push(format!("{}: the example is not its schema's: {e}", op.id()));
            }
            let mut body = example.clone();
            for (field, from) in test["fill"].as_object().into_iter().flatten() {
                let (step, name) = from.as_str().unwrap().split_once('.').unwrap();
                set(&mut body, field, answers[step][name].clone());
            }
            body
        });
        path.push_str(test["query"].as_str().unwrap_or(""));
        let expected = u16::try_from(test["status"].as_u64().unwrap()).unwrap();
        let answer = send(&server, &op.method, &path, &[], body.as_ref());
        failures.extend(judge(op, "its example", &answer, Some(expected)));

        // Refusals, each of a status the operation documents.
        if op.path.contains("{id}") {
            let elsewhere = op.path.replace("{id}", &theirs);
            let answer = send(&server, &op.method, &elsewhere, &[], body.as_ref());
            failures.extend(judge(op, "another namespace's key", &answer, Some(404)));
            if answer.body["error"]["code"] != "no_such_key" {
                failures.push(format!(
                    "{}: another namespace's key: {}",
                    op.id(),
                    answer.text
                ));
            }
        }
        if let (Some((schema, _)), Some(body)) = (op.body(), &body) {
            let raw = send_raw(
                &server,
                &op.method,
                &path,
                "application/json",
                b"{ not json",
            );
            failures.extend(judge(op, "malformed JSON", &raw, Some(400)));
            let typed = send_raw(
                &server,
                &op.method,
                &path,
                "text/plain",
                body.to_string().as_bytes(),
            );
            failures.extend(judge(op, "a text/plain body", &typed, Some(415)));
            let mut unknown = body.clone();
            unknown["no_such_field"] = json!(true);
            let answer = send(&server, &op.method, &path, &[], Some(&unknown));
            failures.extend(judge(op, "an unknown field", &answer, Some(422)));
            for required in v.resolve(schema)["required"].as_array().unwrap() {
                let required = required.as_str().unwrap();
                let mut missing = body.clone();
                missing.as_object_mut().unwrap().remove(required);
                let answer = send(&server, &op.method, &path, &[], Some(&missing));
                failures.extend(judge(
                    op,
                    &format!("without `{required}`"),
                    &answer,
                    Some(422),
                ));
            }
        }
    }

    // A body too large.
    let sign = ops.iter().find(|o| o.path == "/v1/keys/{id}/sign").unwrap();
    let big = vec![b'a'; keyhold::service::MAX_BODY + 1];
    let answer = send_raw(
        &server,
        "POST",
        &sign.path.replace("{id}", &fixtures[&sign.id()]),
        "application/json",
        &big,
    );
    failures.extend(judge(sign, "a body too large", &answer, Some(413)));

    // Not in the document: not served. A method a path does not take: 405, with `Allow` the
    // methods the document gives the path (GET with HEAD): on every path, a key action's too.
    let method_not_allowed = json!({"$ref": "#/components/responses/MethodNotAllowed"});
    let not_allowed = v.resolve(&method_not_allowed);
    let key = &fixtures[&sign.id()];
    for op in &ops {
        let path = op.path.replace("{id}", key);
        let mut documented: Vec<&str> = ops
            .iter()
            .filter(|o| o.path == op.path)
            .flat_map(|o| match o.method.as_str() {
                "GET" => vec!["GET", "HEAD"],
                other => vec![other],
            })
            .collect();
        documented.sort_unstable();
        let other_methods = ["DELETE", "PUT", "GET", "POST"]
            .into_iter()
            .filter(|m| !documented.contains(m));
        for method in other_methods {
            let answer = send(&server, method, &path, &[], None);
            let body_ok = v.check(
                &not_allowed["content"]["application/json"]["schema"],
                &answer.body,
                "$",
            );
            let mut allowed: Vec<&str> = answer
                .header("allow")
                .unwrap_or("")
                .split(',')
                .map(str::trim)
                .collect();
            allowed.sort_unstable();
            if answer.status != 405
                || answer.body["error"]["code"] != "method_not_allowed"
                || body_ok.is_err()
                || allowed != documented
            {
                failures.push(format!(
                    "{method} {}: {} (Allow: {:?}, documented {documented:?}) {}",
                    op.path,
                    answer.status,
                    answer.header("allow"),
                    answer.text
                ));
            }
        }
    }
    for (method, path) in [
        ("GET", "/v1/nowhere".to_owned()),
        ("POST", format!("/v1/keys/{key}/bake")),
        ("GET", format!("/v1/keys/{key}/bake")),
        ("DELETE", format!("/v1/keys/{key}/bake")),
        ("GET", "/v2/health".to_owned()),
    ] {
        let answer = send(&server, method, &path, &[], Some(&json!({})));
        let valid = v.check(&error, &answer.body, "$");
        // `Allow` belongs to a 405 only: on a 404 it would name methods of another answer.
        if answer.status != 404
            || answer.body["error"]["code"] != "no_such_endpoint"
            || valid.is_err()
            || answer.header("allow").is_some()
        {
            failures.push(format!(
                "{method} {path}: {} {}",
                answer.status, answer.text
            ));
        }
    }

    // Each grant is needed: a token client granted every other operation is refused (403).
    let mut tokens: BTreeMap<&str, String> = BTreeMap::new();
    for op in &ops {
        let Some(grant) = op.grant() else {
            continue;
        };
        assert!(
            grants.iter().any(|g| g == grant),
            "{}: no operation `{grant}`",
            op.id()
        );
        let token = tokens.entry(grant).or_insert_with(|| {
            let others: Vec<&str> = grants
                .iter()
                .map(String::as_str)
                .filter(|g| *g != grant)
                .collect();
            let name = format!("without-{grant}");
            let out = env.run(
                &[
                    "client",
                    "add",
                    &name,
                    "--namespace",
                    "app",
                    "--operations",
                    &others.join(","),
                ],
                b"",
            );
            assert_ok(&out, &format!("client add {name}"));
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        });
        let path = match fixtures.get(&op.id()) {
            Some(id) => op.path.replace("{id}", id),
            None => op.path.clone(),
        };
        let bearer = format!("Authorization: Bearer {token}");
        let body = op.body().map(|(_, example)| example.clone());
        let answer = send(&server, &op.method, &path, &[&bearer], body.as_ref());
        failures.extend(judge(
            op,
            &format!("not granted `{grant}`"),
            &answer,
            Some(403),
        ));
    }

    // Wrong tokens: 401, then, from the 11th within 60 s, 429 `rate_limited` (last: it blocks
    // this source's tokens for 60 s).
    let wrong = format!("Authorization: Bearer kht1_{}", "A".repeat(43));
    let mut seen = Vec::new();
    for op in &ops {
        let body = op.body().map(|(_, example)| example.clone());
        let answer = send(
            &server,
            &op.method,
            &op.path.replace("{id}", key),
            &[&wrong],
            body.as_ref(),
        );
        failures.extend(judge(op, "a wrong token", &answer, None));
        let code = answer.body["error"]["code"]
            .as_str()
            .unwrap_or("-")
            .to_owned();
        if code == "rate_limited" && answer.header("retry-after").is_none() {
            failures.push(format!("{}: rate_limited without Retry-After", op.id()));
        }
        seen.push((answer.status, code));
    }
    let first_limited = seen.iter().position(|s| s.0 == 429).unwrap_or(seen.len());
    let expected: Vec<(u16, String)> = (0..seen.len())
        .map(|i| {
            if i < first_limited {
                (401, "unauthenticated".to_owned())
            } else {
                (429, "rate_limited".to_owned())
            }
        })
        .collect();
    assert!(first_limited >= 1 && first_limited < seen.len(), "{seen:?}");
    assert_eq!(seen, expected, "wrong tokens");

    assert!(
        failures.is_empty(),
        "the server and docs/openapi.json differ:\n{}",
        failures.join("\n")
    );
}

/// `METHOD path` with `headers` and a JSON `body`.
fn send(
    server: &Server,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<&Value>,
) -> Answer {
    let body = body.map(Value::to_string);
    server.request(method, path, headers, body.as_deref().map(str::as_bytes))
}

/// `METHOD path` with `body` as it is, sent as `content_type`.
fn send_raw(server: &Server, method: &str, path: &str, content_type: &str, body: &[u8]) -> Answer {
    server.request_as(method, path, content_type, &[], Some(body))
}
