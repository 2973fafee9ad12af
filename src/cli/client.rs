//! `keyhold client …`: the service's token clients (docs/service.md, Tokens): add one (its
//! token printed once), list them, remove one.

use clap::{Args, Subcommand};
use keyhold::config::Operation;
use keyhold::time::format_utc;
use keyhold::{ClientGrant, TokenClient};
use zeroize::Zeroizing;

use super::{io, CmdResult, Context, Failure};

#[derive(Debug, Subcommand)]
pub enum ClientCommand {
    /// Add a client of `keyhold serve` with a new bearer token, printed once on stdout
    Add(AddArgs),
    /// List the token clients: names, namespaces, operations, when added (never a token)
    List,
    /// Remove a token client: its token is refused from the next request on
    Remove(RemoveArgs),
}

#[derive(Debug, Args)]
pub struct AddArgs {
    /// The client's name: not a token client's already, nor a [clients.NAME] of the configuration
    name: String,

    /// A namespace whose keys the client sees and uses (repeat it for more)
    // Named as the global --namespace, which a subcommand's own argument of that name replaces.
    #[arg(long = "namespace", value_name = "NS", required = true)]
    namespace: Vec<String>,

    /// The operations it may ask for, comma-separated (create, list, show, pubkey, sign, verify,
    /// encrypt, decrypt, random, …) [default: every operation but those granted by name only:
    /// export, import, audit, maintain, metrics, admin]
    #[arg(long, value_name = "OP,…", value_delimiter = ',')]
    operations: Option<Vec<String>>,
}

#[derive(Debug, Args)]
pub struct RemoveArgs {
    /// The token client's name
    name: String,
}

pub fn run(ctx: &Context, command: &ClientCommand) -> CmdResult {
    match command {
        ClientCommand::Add(a) => add(ctx, a),
        ClientCommand::List => list(ctx),
        ClientCommand::Remove(a) => remove(ctx, a),
    }
}

fn add(ctx: &Context, args: &AddArgs) -> CmdResult {
    // Checked before the store is opened, as every other argument.
    let operations = args
        .operations
        .as_ref()
        .map(|ops| {
            ops.iter()
                .map(|op| op.trim().parse::<Operation>())
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()?;
    if ctx.config.clients.contains_key(&args.name) {
        return Err(Failure::Keyhold(keyhold::Error::InvalidInput(format!(
            "`{0}` is a [clients.{0}] of the configuration ({1}): give the token client another \
             name",
            args.name,
            ctx.config_source.describe()
        ))));
    }
    let grant = ClientGrant {
        namespaces: args.namespace.clone(),
        operations,
    };
    let ks = io::open_keystore(ctx)?;
    let (client, token) = ks.add_client(&args.name, &grant)?;
    // The token is shown here once, from memory zeroized after: nothing keeps it.
    let mut out = Zeroizing::new(String::with_capacity(128));
    if ctx.json {
        let name = serde_json::Value::from(client.name.as_str()).to_string();
        out.push_str(&format!(r#"{{"client":{name},"token":""#));
        out.push_str(token.expose());
        out.push_str("\"}\n");
    } else {
        out.push_str(token.expose());
        out.push('\n');
    }
    io::write_output(None, out.as_bytes())?;
    if !ctx.json {
        eprintln!(
            "keyhold: added token client `{}`: its token (above) is shown this once; give it to \
             the client, which sends it as `Authorization: Bearer TOKEN`",
            io::terminal_safe(&client.name)
        );
    }
    Ok(())
}

fn list(ctx: &Context) -> CmdResult {
    let ks = io::open_store_keys(ctx)?;
    let clients = ks.token_clients()?;
    if ctx.json {
        return io::print_json(&serde_json::Value::Array(
            clients.iter().map(client_json).collect(),
        ));
    }
    let mut out = String::new();
    for c in &clients {
        out.push_str(&client_line(c));
        out.push('\n');
    }
    io::write_output(None, out.as_bytes())
}

fn remove(ctx: &Context, args: &RemoveArgs) -> CmdResult {
    let ks = io::open_keystore(ctx)?;
    let client = ks.remove_client(&args.name)?;
    if ctx.json {
        io::print_json(&serde_json::json!({ "client": client.name, "removed": true }))
    } else {
        io::print_line(&format!(
            "removed token client `{}`: its token is refused from the next request on",
            io::terminal_safe(&client.name)
        ))
    }
}

fn operation_names(c: &TokenClient) -> Option<Vec<&'static str>> {
    c.grant
        .operations
        .as_ref()
        .map(|ops| ops.iter().map(|op| op.as_str()).collect())
}

/// `NAME namespaces=A,B operations=OP,…|default created=TIME` (`default`: the default grant).
fn client_line(c: &TokenClient) -> String {
    io::terminal_safe(&format!(
        "{} namespaces={} operations={} created={}",
        c.name,
        c.grant.namespaces.join(","),
        operation_names(c).map_or_else(|| "default".to_owned(), |ops| ops.join(",")),
        format_utc(c.created_at),
    ))
}

fn client_json(c: &TokenClient) -> serde_json::Value {
    serde_json::json!({
        "client": c.name,
        "namespaces": c.grant.namespaces,
        "operations": operation_names(c),
        "created_at": format_utc(c.created_at),
    })
}
