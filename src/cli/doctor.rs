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
        io::print_json(&json(&doctor))?;
    } else {
        io::write_output(None, text(&ks, &doctor).as_bytes())?;
    }
    verdict(&doctor)
}

/// Exit codes beyond the common ones (docs/cli.md): 8 when the store and the devices disagree
/// (missing objects, orphans), before 7 when something could not be checked (a backend
/// unavailable, keys of a backend not configured); 6 for a forged record comes from `doctor()`.
const DISAGREE: u8 = 8;
const UNCHECKED: u8 = 7;

fn verdict(doctor: &Doctor) -> CmdResult {
    let unavailable = doctor
        .backends
        .iter()
        .filter(|b| b.report.is_err() || b.capabilities.is_err())
        .count();
    let found: Vec<String> = [
        (
            doctor.missing.len(),
            "key with missing objects",
            "keys with missing objects",
        ),
        (doctor.orphans.len(), "orphaned object", "orphaned objects"),
        (unavailable, "backend unavailable", "backends unavailable"),
        (doctor.unchecked.len(), "key unchecked", "keys unchecked"),
    ]
    .into_iter()
    .filter(|&(n, _, _)| n > 0)
    .map(|(n, one, many)| format!("{n} {}", if n == 1 { one } else { many }))
    .collect();
    if doctor.healthy() {
        return Ok(());
    }
    let code = if doctor.disagrees() {
        DISAGREE
    } else {
        UNCHECKED
    };
    Err(Failure::Findings {
        code,
        kind: "doctor_findings",
        summary: format!("doctor found problems: {}", found.join(", ")),
    })
}

fn text(ks: &keyhold::Keystore, doctor: &Doctor) -> String {
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
                    // Token labels, models and serials are text anyone with the token chose.
                    out.push_str(&format!("  {k}: {}\n", io::terminal_safe(v)));
                }
                if let Some(objects) = &report.objects {
                    out.push_str(&format!("  key objects: {}\n", objects.len()));
                }
            }
            Err(e) => out.push_str(&format!(
                "  UNAVAILABLE: {}\n",
                io::terminal_safe(&e.to_string())
            )),
        }
        match &b.capabilities {
            Ok(caps) => {
                let mut can = Vec::new();
                let mut cannot = Vec::new();
                let mut unknown = Vec::new();
                for t in KeyType::ALL {
                    for &p in t.purposes() {
                        if let Some(why) = caps.unknown(t, p) {
                            unknown.push(format!("{t}/{p} ({})", io::terminal_safe(why)));
                        } else if caps.supports(t, p) {
                            can.push(format!("{t}/{p}"));
                        } else {
                            cannot.push(format!(
                                "{t}/{p} ({})",
                                io::terminal_safe(caps.missing(t, p).unwrap_or("not supported"))
                            ));
                        }
                    }
                }
                out.push_str(&format!("  key types: {}\n", can.join(", ")));
                for u in unknown {
                    out.push_str(&format!("  not known until tried: {u}\n"));
                }
                for c in cannot {
                    out.push_str(&format!("  cannot: {c}\n"));
                }
            }
            Err(e) => out.push_str(&format!(
                "  key types: unknown ({})\n",
                io::terminal_safe(&e.to_string())
            )),
        }
    }
    out.push_str(&format!("\norphaned objects: {}\n", doctor.orphans.len()));
    for o in &doctor.orphans {
        out.push_str(&format!(
            "  {}:{} label `{}` (no record; remove with --remove-orphan {}:{})\n",
            o.backend,
            o.locator,
            io::terminal_safe(&o.label),
            o.backend,
            o.locator
        ));
    }
    out.push_str(&format!(
        "objects of other stores or applications: {} (left alone)\n",
        doctor.foreign_objects
    ));
    out.push_str(&format!("missing objects: {}\n", doctor.missing.len()));
    for m in &doctor.missing {
        let k = &m.key;
        out.push_str(&format!(
            "  {}/{} in {} (locator {}): its {} not on the device\n",
            k.namespace,
            k.name,
            k.backend,
            k.locator,
            match m.absent.as_slice() {
                [one] => format!("{one} is"),
                many => format!("{} are", many.join(" and ")),
            }
        ));
    }
    out.push_str(&format!("unchecked keys: {}\n", doctor.unchecked.len()));
    for u in &doctor.unchecked {
        let k = &u.key;
        out.push_str(&format!(
            "  {}/{} in {}: not checked, {}\n",
            k.namespace,
            k.name,
            k.backend,
            io::terminal_safe(&u.reason)
        ));
    }
    out
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
            let (types, unknown) = match &b.capabilities {
                Ok(caps) => (
                    serde_json::Value::from(
                        caps.iter()
                            .filter(|&(t, p)| caps.unknown(t, p).is_none())
                            .map(|(t, p)| format!("{t}/{p}"))
                            .collect::<Vec<_>>(),
                    ),
                    caps.iter()
                        .filter_map(|(t, p)| {
                            caps.unknown(t, p).map(|why| {
                                serde_json::json!({ "key_type": format!("{t}/{p}"), "why": why })
                            })
                        })
                        .collect::<Vec<_>>(),
                ),
                Err(e) => (serde_json::json!({ "error": e.to_string() }), Vec::new()),
            };
            serde_json::json!({
                "name": b.name, "report": report, "key_types": types,
                "unknown_until_tried": unknown,
            })
        })
        .collect();
    serde_json::json!({
        "backends": backends,
        "foreign_objects": doctor.foreign_objects,
        "orphans": doctor.orphans.iter().map(|o| serde_json::json!({
            "backend": o.backend, "locator": o.locator, "label": o.label,
        })).collect::<Vec<_>>(),
        "missing": doctor.missing.iter().map(|m| serde_json::json!({
            "id": m.key.id, "namespace": m.key.namespace, "name": m.key.name,
            "backend": m.key.backend, "locator": m.key.locator, "absent": m.absent,
        })).collect::<Vec<_>>(),
        "unchecked": doctor.unchecked.iter().map(|u| serde_json::json!({
            "id": u.key.id, "namespace": u.key.namespace, "name": u.key.name,
            "backend": u.key.backend, "reason": u.reason,
        })).collect::<Vec<_>>(),
        "healthy": doctor.healthy(),
    })
}
