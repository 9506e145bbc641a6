//! `kvtier clients`: who is connected to the daemon (engines, tools), what each registered and
//! what it holds now. An admin request: root or the daemon's uid.

use super::common::ConnectArgs;
use kvtier_proto::v1 as pb;

/// Arguments of `kvtier clients`.
#[derive(clap::Args, Debug)]
pub struct ClientsArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// A namespace as `model/id-prefix` (`?` for a model not known yet).
pub fn namespace_label(n: &pb::NamespaceRef) -> String {
    let model = if n.model.is_empty() { "?" } else { n.model.as_str() };
    format!("{model}/{}", n.id_prefix)
}

/// A duration in its two largest units: `45s`, `1m30s`, `2h5m`, `3d4h`.
fn uptime(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m{}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d{}h", secs / 86400, secs % 86400 / 3600),
    }
}

/// One table row.
fn row(c: &pb::ClientInfo) -> String {
    let pid = if c.pid == 0 { "-".to_string() } else { c.pid.to_string() };
    let copies = if c.kv_caches > 0 { "daemon" } else { "-" };
    let namespaces: Vec<String> = c.namespaces.iter().map(namespace_label).collect();
    let name = if c.name.is_empty() { "(no hello)" } else { c.name.as_str() };
    format!(
        "{:>5} {:>8} {:>6} {:>9} {:>10} {:>8} {:>7}  {:<24} {}",
        c.id,
        pid,
        c.uid,
        uptime(c.connected_secs),
        c.requests,
        c.held_blocks,
        copies,
        name,
        namespaces.join(", ")
    )
}

/// `kvtier clients`.
pub async fn run(args: ClientsArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect("clients").await?;
    let reply = c.clients().await?;
    if args.json {
        let list: Vec<_> = (reply.clients.iter())
            .map(|c| {
                serde_json::json!({"id": c.id, "name": c.name, "pid": c.pid, "uid": c.uid,
                    "connected_secs": c.connected_secs, "requests": c.requests, "held_blocks": c.held_blocks,
                    "kv_caches": c.kv_caches,
                    "namespaces": c.namespaces.iter().map(|n| serde_json::json!({"model": n.model,
                        "id_prefix": n.id_prefix})).collect::<Vec<_>>()})
            })
            .collect();
        println!("{}", serde_json::json!({ "clients": list }));
        return Ok(());
    }
    println!(
        "{:>5} {:>8} {:>6} {:>9} {:>10} {:>8} {:>7}  {:<24} namespaces",
        "id", "pid", "uid", "up", "requests", "held", "copies", "name"
    );
    for client in &reply.clients {
        println!("{}", row(client));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uptimes_use_two_units() {
        assert_eq!([uptime(0), uptime(59), uptime(60), uptime(3599)], ["0s", "59s", "1m0s", "59m59s"]);
        assert_eq!([uptime(3600), uptime(86399), uptime(90000)], ["1h0m", "23h59m", "1d1h"]);
    }

    #[test]
    fn rows_show_unknowns_plainly() {
        let c = pb::ClientInfo {
            id: 3,
            uid: 1000,
            connected_secs: 90,
            namespaces: vec![
                pb::NamespaceRef { model: "llama".into(), id_prefix: "1a2b3c4d".into() },
                pb::NamespaceRef { model: String::new(), id_prefix: "00ff00ff".into() },
            ],
            ..Default::default()
        };
        let r = row(&c);
        assert!(r.contains("1m30s") && r.contains("(no hello)"), "{r}");
        assert!(r.ends_with("llama/1a2b3c4d, ?/00ff00ff"), "{r}");
        assert_eq!(r.split_whitespace().nth(1), Some("-"), "unknown pid: {r}");
    }
}
