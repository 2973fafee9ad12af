//! `keyhold doctor`: backends, tokens, mechanisms, and objects the store and devices disagree on.

use clap::Args;
use keyhold::{Doctor, KeyType};

use super::{io, CmdResult, Context, Failure};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Destroy an orphaned device object, named BACKEND:LOCATOR as doctor lists it
    #[arg(long, value_name = "BACKEND:LOCATOR")]
    remove_orphan: Vec<String>,
}

pub fn run(ctx: &Context, args: &DoctorArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    for target in &args.remove_orphan {
        let (backend, locator) = target.split_once(':').ok_or_else(|| {
            Failure::Cli(format!(
                "--remove-orphan takes BACKEND:LOCATOR, not `{target}`"
            ))
        })?;
        ks.remove_orphan(backend, locator)?;
        io::print_line(&format!("removed orphaned object {locator} from {backend}"))?;
    }
    let doctor = ks.doctor()?;
    if ctx.json {
        return io::print_json(&json(&doctor));
    }
    let mut out = format!(
        "store: {} (id {}, sealer {})\n",
        ks.dir().display(),
        ks.store_id(),
        ks.sealer_kind()
    );
    for b in &doctor.backends {
        out.push_str(&format!("\nbackend {}\n", b.name));
        match &b.report {
            Ok(report) => {
                out.push_str(&format!("  kind: {}\n", report.kind));
                for (k, v) in &report.details {
                    out.push_str(&format!("  {k}: {v}\n"));
                }
                if let Some(objects) = &report.objects {
                    out.push_str(&format!("  key objects: {}\n", objects.len()));
                }
            }
            Err(e) => out.push_str(&format!("  UNAVAILABLE: {e}\n")),
        }
        match &b.capabilities {
            Ok(caps) => {
                let mut can = Vec::new();
                let mut cannot = Vec::new();
                for t in KeyType::ALL {
                    for &p in t.purposes() {
                        if caps.supports(t, p) {
                            can.push(format!("{t}/{p}"));
                        } else {
                            cannot.push(format!(
                                "{t}/{p} ({})",
                                caps.missing(t, p).unwrap_or("not supported")
                            ));
                        }
                    }
                }
                out.push_str(&format!("  key types: {}\n", can.join(", ")));
                for c in cannot {
                    out.push_str(&format!("  cannot: {c}\n"));
                }
            }
            Err(e) => out.push_str(&format!("  key types: unknown ({e})\n")),
        }
    }
    out.push_str(&format!("\norphaned objects: {}\n", doctor.orphans.len()));
    for o in &doctor.orphans {
        out.push_str(&format!(
            "  {}:{} label `{}` (no record; remove with --remove-orphan {}:{})\n",
            o.backend, o.locator, o.label, o.backend, o.locator
        ));
    }
    out.push_str(&format!(
        "objects of other stores or applications: {} (left alone)\n",
        doctor.foreign_objects
    ));
    out.push_str(&format!("missing objects: {}\n", doctor.missing.len()));
    for k in &doctor.missing {
        out.push_str(&format!(
            "  {}/{} in {} (locator {}): its object is not on the device\n",
            k.namespace, k.name, k.backend, k.locator
        ));
    }
    io::write_output(None, out.as_bytes())
}

fn json(doctor: &Doctor) -> serde_json::Value {
    let backends: Vec<_> = doctor
        .backends
        .iter()
        .map(|b| {
            let report = match &b.report {
                Ok(r) => serde_json::json!({
                    "kind": r.kind,
                    "details": r.details.iter().map(|(k, v)| (k.clone(), serde_json::Value::from(v.clone()))).collect::<serde_json::Map<_, _>>(),
                    "objects": r.objects.as_ref().map(|o| o.len()),
                }),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            let types = match &b.capabilities {
                Ok(caps) => serde_json::Value::from(
                    caps.iter().map(|(t, p)| format!("{t}/{p}")).collect::<Vec<_>>(),
                ),
                Err(e) => serde_json::json!({ "error": e.to_string() }),
            };
            serde_json::json!({ "name": b.name, "report": report, "key_types": types })
        })
        .collect();
    serde_json::json!({
        "backends": backends,
        "foreign_objects": doctor.foreign_objects,
        "orphans": doctor.orphans.iter().map(|o| serde_json::json!({
            "backend": o.backend, "locator": o.locator, "label": o.label,
        })).collect::<Vec<_>>(),
        "missing": doctor.missing.iter().map(|k| serde_json::json!({
            "id": k.id, "namespace": k.namespace, "name": k.name, "backend": k.backend,
            "locator": k.locator,
        })).collect::<Vec<_>>(),
    })
}
