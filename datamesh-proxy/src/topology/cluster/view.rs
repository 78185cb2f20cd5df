//! The proxy's own answers to cluster commands. The proxy presents itself to clients as a
//! healthy cluster of ONE node (itself, at the address the client dialled) owning all 16384
//! slots: cluster-aware clients then send every command to the proxy, which does the real
//! routing, redirects, splitting and failover handling, and the backend cluster's shape (and
//! its changes) stays invisible to them.

use std::net::SocketAddr;

use bytes::{BufMut, Bytes, BytesMut};

use super::slots::key_slot;

/// A stable 40-hex-digit node id for the proxy listener at `addr` (what CLUSTER MYID/NODES/
/// SLOTS/SHARDS show), derived from the address so every answer agrees.
pub fn proxy_node_id(addr: SocketAddr) -> String {
    // FNV-1a 64 over the address text, stretched to 160 bits with different seeds.
    let text = addr.to_string();
    let mut out = String::with_capacity(40);
    for seed in 0u64..3 {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        for b in text.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        out.push_str(&format!("{h:016x}"));
    }
    out.truncate(40);
    out
}

fn bulk(out: &mut BytesMut, s: &[u8]) {
    out.put_slice(format!("${}\r\n", s.len()).as_bytes());
    out.put_slice(s);
    out.put_slice(b"\r\n");
}

fn bulk_reply(s: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(s.len() + 16);
    bulk(&mut out, s);
    out.freeze()
}

/// `CLUSTER INFO`.
///
/// The proxy presents itself to clients as a healthy cluster of ONE node (itself) owning all
/// 16384 slots. Cluster-aware clients (redis-py `RedisCluster`, go-redis `ClusterClient`,
/// Jedis `JedisCluster`) then send every command to the proxy, which does the real routing,
/// redirects, splitting and failover handling; the backend cluster's shape (and its
/// changes) stays invisible to them, and pod connections stay on the captured address.
pub fn cluster_info_reply() -> Bytes {
    let text = [
        "cluster_state:ok",
        "cluster_slots_assigned:16384",
        "cluster_slots_ok:16384",
        "cluster_slots_pfail:0",
        "cluster_slots_fail:0",
        "cluster_known_nodes:1",
        "cluster_size:1",
        "cluster_current_epoch:1",
        "cluster_my_epoch:1",
        "cluster_stats_messages_sent:0",
        "cluster_stats_messages_received:0",
        "total_cluster_links_buffer_limit_exceeded:0",
        "",
    ]
    .join("\r\n");
    bulk_reply(text.as_bytes())
}

/// `CLUSTER SLOTS`: one range 0-16383 owned by `addr` (the address the client should use
/// for the proxy: the endpoint address it dialled when captured, else the listener).
pub fn cluster_slots_reply(addr: SocketAddr) -> Bytes {
    let mut out = BytesMut::new();
    out.put_slice(b"*1\r\n*3\r\n:0\r\n:16383\r\n*3\r\n");
    bulk(&mut out, addr.ip().to_string().as_bytes());
    out.put_slice(format!(":{}\r\n", addr.port()).as_bytes());
    bulk(&mut out, proxy_node_id(addr).as_bytes());
    out.freeze()
}

/// `CLUSTER SHARDS`: one shard, slots 0-16383, one master node `addr`. `resp3` selects maps
/// instead of flat key/value arrays, as Redis does per protocol.
pub fn cluster_shards_reply(addr: SocketAddr, resp3: bool) -> Bytes {
    let (map2, map7) = if resp3 {
        ("%2\r\n", "%7\r\n")
    } else {
        ("*4\r\n", "*14\r\n")
    };
    let ip = addr.ip().to_string();
    let mut out = BytesMut::new();
    out.put_slice(b"*1\r\n");
    out.put_slice(map2.as_bytes());
    bulk(&mut out, b"slots");
    out.put_slice(b"*2\r\n:0\r\n:16383\r\n");
    bulk(&mut out, b"nodes");
    out.put_slice(b"*1\r\n");
    out.put_slice(map7.as_bytes());
    bulk(&mut out, b"id");
    bulk(&mut out, proxy_node_id(addr).as_bytes());
    bulk(&mut out, b"port");
    out.put_slice(format!(":{}\r\n", addr.port()).as_bytes());
    bulk(&mut out, b"ip");
    bulk(&mut out, ip.as_bytes());
    bulk(&mut out, b"endpoint");
    bulk(&mut out, ip.as_bytes());
    bulk(&mut out, b"role");
    bulk(&mut out, b"master");
    bulk(&mut out, b"replication-offset");
    out.put_slice(b":0\r\n");
    bulk(&mut out, b"health");
    bulk(&mut out, b"online");
    out.freeze()
}

/// `CLUSTER NODES`: one line, the proxy as `myself,master` with all slots.
pub fn cluster_nodes_reply(addr: SocketAddr) -> Bytes {
    let line = format!(
        "{} {}:{}@0 myself,master - 0 0 1 connected 0-16383\n",
        proxy_node_id(addr),
        addr.ip(),
        addr.port()
    );
    bulk_reply(line.as_bytes())
}

/// `CLUSTER MYID`.
pub fn cluster_myid_reply(addr: SocketAddr) -> Bytes {
    bulk_reply(proxy_node_id(addr).as_bytes())
}

/// `READONLY` / `READWRITE` from a client: the proxy decides where reads go
/// (`read_from_replicas`), so both are accepted and change nothing.
pub fn readonly_reply() -> Bytes {
    Bytes::from_static(b"+OK\r\n")
}

/// Answers `CLUSTER <sub> ...` locally; `args` are the arguments after `CLUSTER`. `addr` is
/// the address shown as the proxy node (see [`cluster_slots_reply`]). Subcommands that
/// would reveal or change the backend cluster (MEET, FAILOVER, SETSLOT, GETKEYSINSLOT, ...)
/// get `-ERR ... not supported`, consistent with the single-node view.
pub fn cluster_reply(args: &[Bytes], addr: SocketAddr, resp3: bool) -> Bytes {
    let Some(sub) = args.first() else {
        return Bytes::from_static(b"-ERR wrong number of arguments for 'cluster' command\r\n");
    };
    let sub_up = sub.to_ascii_uppercase();
    match sub_up.as_slice() {
        b"INFO" => cluster_info_reply(),
        b"SLOTS" => cluster_slots_reply(addr),
        b"SHARDS" => cluster_shards_reply(addr, resp3),
        b"NODES" => cluster_nodes_reply(addr),
        b"MYID" => cluster_myid_reply(addr),
        // One shard: its id is the node id.
        b"MYSHARDID" => cluster_myid_reply(addr),
        b"KEYSLOT" => match args.get(1) {
            Some(k) if args.len() == 2 => Bytes::from(format!(":{}\r\n", key_slot(k))),
            _ => Bytes::from_static(b"-ERR wrong number of arguments for 'cluster|keyslot' command\r\n"),
        },
        _ => Bytes::from(format!(
            "-ERR CLUSTER {} is not supported by the datamesh proxy: it presents the cluster as one node\r\n",
            String::from_utf8_lossy(&sub_up)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resp::Value;
    use crate::testing::{addr, bytes};
    use crate::topology::cluster::slots::{SlotMap, SLOTS};

    fn parse_all(raw: &Bytes) -> Value {
        Value::parse(raw).expect("one complete frame")
    }

    #[test]
    fn cluster_answers_describe_one_node() {
        let a = addr("198.19.3.1:6379");
        let id = proxy_node_id(a);
        assert_eq!(id.len(), 40);
        assert!(id.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(id, proxy_node_id(a));
        assert_ne!(id, proxy_node_id(addr("198.19.3.1:6380")));

        let info = parse_all(&cluster_reply(&[bytes("info")], a, false));
        let text = info.as_str().expect("bulk").to_string();
        assert!(
            text.contains("cluster_state:ok\r\n") && text.contains("cluster_slots_assigned:16384")
        );

        // Our own parser reads our SLOTS/SHARDS answers back as "the proxy owns everything".
        let slots = parse_all(&cluster_reply(&[bytes("SLOTS")], a, false));
        let m = SlotMap::from_slots_reply(&slots, a).expect("slots");
        assert_eq!((m.assigned(), m.masters().to_vec()), (SLOTS, vec![a]));
        for resp3 in [false, true] {
            let shards = parse_all(&cluster_reply(&[bytes("shards")], a, resp3));
            let m = SlotMap::from_shards_reply(&shards, a).expect("shards");
            assert_eq!((m.assigned(), m.masters().to_vec()), (SLOTS, vec![a]));
        }
        let nodes = parse_all(&cluster_reply(&[bytes("NODES")], a, false));
        assert_eq!(
            nodes.as_str(),
            Some(
                format!("{id} 198.19.3.1:6379@0 myself,master - 0 0 1 connected 0-16383\n")
                    .as_str()
            )
        );
        assert_eq!(
            parse_all(&cluster_reply(&[bytes("myid")], a, false)).as_str(),
            Some(id.as_str())
        );
        assert_eq!(
            cluster_reply(&[bytes("KEYSLOT"), bytes("foo")], a, false).as_ref(),
            b":12182\r\n"
        );
        assert!(cluster_reply(&[bytes("FAILOVER")], a, false)
            .starts_with(b"-ERR CLUSTER FAILOVER is not supported"));
        assert!(cluster_reply(&[], a, false).starts_with(b"-ERR wrong number"));
        assert_eq!(readonly_reply().as_ref(), b"+OK\r\n");
    }
}
