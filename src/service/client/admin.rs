//! [`RemoteKeystore`] as the store's administration ([`StoreAdmin`]): the audit log, the store's
//! verification, the due work and the token clients, asked of a service for a client granted
//! `audit`, `maintain` or `admin`.

use hyper::Method;
use serde_json::{json, Value};

use super::{check_id, malformed, text, with_query, RemoteKeystore};
use crate::error::{Error, Result};
use crate::keystore::StoreAdmin;
use crate::time::format_utc;

impl StoreAdmin for RemoteKeystore {
    fn verify_audit(&self) -> Result<crate::audit::Verified> {
        crate::audit::Verified::from_json(&self.call(Method::POST, "/v1/audit/verify", None)?)
    }

    fn audit_entries(
        &self,
        key: Option<&str>,
        since: Option<i64>,
    ) -> Result<Vec<crate::audit::Entry>> {
        let since = since.map(format_utc);
        let mut query: Vec<(&str, &str)> = Vec::new();
        if let Some(id) = key {
            check_id(id)?;
            query.push(("key", id));
        }
        if let Some(since) = &since {
            query.push(("since", since));
        }
        let answer = self.call(Method::GET, &with_query("/v1/audit", &query)?, None)?;
        answer
            .as_array()
            .ok_or_else(|| malformed("audit entries"))?
            .iter()
            .map(crate::audit::Entry::from_json)
            .collect()
    }

    fn verify_store(&self) -> Result<crate::verify::VerifyReport> {
        crate::verify::VerifyReport::from_json(&self.call(
            Method::POST,
            "/v1/store/verify",
            None,
        )?)
    }

    fn token_clients(&self) -> Result<Vec<crate::TokenClient>> {
        let answer = self.call(Method::GET, "/v1/clients", None)?;
        let mut tokens = Vec::new();
        for c in answer.as_array().ok_or_else(|| malformed("clients"))? {
            if c["authenticates_by"] != json!(["token"]) {
                continue;
            }
            let strings = |field: &str| -> Result<Vec<String>> {
                c[field]
                    .as_array()
                    .ok_or_else(|| malformed("clients"))?
                    .iter()
                    .map(|v| {
                        v.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| malformed("clients"))
                    })
                    .collect()
            };
            let operations = match &c["operations"] {
                Value::Null => None,
                _ => Some(
                    strings("operations")?
                        .iter()
                        .map(|op| op.parse())
                        .collect::<Result<_>>()?,
                ),
            };
            tokens.push(crate::TokenClient {
                name: text(c, "name")?.to_owned(),
                grant: crate::ClientGrant {
                    namespaces: strings("namespaces")?,
                    operations,
                },
                created_at: crate::time::parse_instant(text(c, "added")?, 0)?,
            });
        }
        Ok(tokens)
    }

    fn maintain(&self) -> Result<crate::Maintenance> {
        let answer = self.call(Method::POST, "/v1/maintain", None)?;
        let list = |field: &str| {
            answer[field]
                .as_array()
                .ok_or_else(|| malformed("maintenance"))
        };
        let mut report = crate::Maintenance::default();
        for d in list("done")? {
            report.done.push(crate::Done {
                key: text(d, "key")?.to_owned(),
                action: text(d, "action")?.to_owned(),
            });
        }
        for f in list("failed")? {
            let status = f["status"]
                .as_u64()
                .and_then(|s| u16::try_from(s).ok())
                .ok_or_else(|| malformed("maintenance"))?;
            let error = Error::remote(
                text(&f["error"], "code")?,
                status,
                text(&f["error"], "message")?.to_owned(),
            );
            report.failed.push((text(f, "key")?.to_owned(), error));
        }
        Ok(report)
    }
}
