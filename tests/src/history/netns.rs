//! Network namespaces for the history test's partitions: one namespace per node, joined by a
//! bridge in the test's own namespace, on addresses the test picks (`10.213.<x>.<node + 1>`, the
//! bridge at `.254`). A partition adds blackhole routes between the two sides inside their
//! namespaces, so each node still answers its clients (through the bridge address) while it
//! cannot reach the nodes across the cut. Everything made here is removed on drop, even when
//! the test panics.
//!
//! Needs root and `ip` (iproute2); [`Netns::create`] says why when they are missing, and the
//! caller runs without partitions.

use std::net::{IpAddr, Ipv4Addr};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::procs::NetnsHost;

/// Namespaces made by this process so far: part of each name, so two clusters of one test
/// binary never share a name or a subnet.
static MADE: AtomicU32 = AtomicU32::new(0);

/// A bridge and one namespace per node, with a veth pair each.
pub struct Netns {
    bridge: String,
    namespaces: Vec<String>,
    addrs: Vec<Ipv4Addr>,
    /// Blackhole routes in place: (namespace index, address cut off).
    cuts: Mutex<Vec<(usize, Ipv4Addr)>>,
}

/// Runs `ip` with `args`; the error names the command and what it printed.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run `ip {}`: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Netns {
    /// Makes a bridge and `nodes` namespaces, or says why it cannot (not root, no `ip`, no
    /// namespace support). Whatever was made before a failure is removed.
    pub fn create(nodes: usize) -> Result<Netns, String> {
        assert!(nodes < 250, "at most 249 nodes fit the subnet");
        let made = MADE.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        // Interface names have at most 15 bytes: "sh" + pid (<= 7 digits) + made + "v" + node.
        let tag = format!("{}{}", pid % 10_000_000, made % 10);
        let subnet = u8::try_from((pid as usize * 7 + made as usize) % 250 + 1).unwrap_or(1);
        let mut net = Netns {
            bridge: format!("sh{tag}b"),
            namespaces: Vec::new(),
            addrs: (0..nodes)
                .map(|i| Ipv4Addr::new(10, 213, subnet, u8::try_from(i + 1).unwrap_or(1)))
                .collect(),
            cuts: Mutex::new(Vec::new()),
        };
        let bridge = net.bridge.clone();
        let gateway = format!("10.213.{subnet}.254/24");
        // Bridged packets skip iptables: a host firewall's FORWARD policy must not cut the nodes
        // off from each other before the test does.
        ip(&[
            "link",
            "add",
            &bridge,
            "type",
            "bridge",
            "nf_call_iptables",
            "0",
        ])?;
        ip(&["addr", "add", &gateway, "dev", &bridge])?;
        ip(&["link", "set", &bridge, "up"])?;
        for i in 0..nodes {
            let ns = format!("sh{tag}n{i}");
            ip(&["netns", "add", &ns])?;
            net.namespaces.push(ns.clone());
            let outside = format!("sh{tag}v{i}");
            let inside = format!("sh{tag}p{i}");
            let addr = format!("{}/24", net.addrs[i]);
            ip(&[
                "link", "add", &outside, "type", "veth", "peer", "name", &inside,
            ])?;
            ip(&["link", "set", &inside, "netns", &ns])?;
            ip(&["link", "set", &outside, "master", &bridge])?;
            ip(&["link", "set", &outside, "up"])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])?;
            ip(&[
                "netns", "exec", &ns, "ip", "addr", "add", &addr, "dev", &inside,
            ])?;
            ip(&["netns", "exec", &ns, "ip", "link", "set", &inside, "up"])?;
        }
        Ok(net)
    }

    /// Where each node runs, for [`crate::procs::ProcOptions::netns`].
    pub fn hosts(&self) -> Vec<NetnsHost> {
        self.namespaces
            .iter()
            .zip(&self.addrs)
            .map(|(ns, addr)| NetnsHost {
                namespace: ns.clone(),
                addr: IpAddr::V4(*addr),
            })
            .collect()
    }

    /// Cuts the nodes of `side` off from every other node, both ways. Clients still reach all.
    pub fn partition(&self, side: &[usize]) -> Result<(), String> {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        for a in 0..self.namespaces.len() {
            for b in 0..self.namespaces.len() {
                if side.contains(&a) == side.contains(&b) {
                    continue;
                }
                let target = format!("{}/32", self.addrs[b]);
                ip(&[
                    "netns",
                    "exec",
                    &self.namespaces[a],
                    "ip",
                    "route",
                    "add",
                    "blackhole",
                    &target,
                ])?;
                cuts.push((a, self.addrs[b]));
            }
        }
        Ok(())
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<(), String> {
        let mut cuts = self.cuts.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((a, addr)) = cuts.pop() {
            let target = format!("{addr}/32");
            ip(&[
                "netns",
                "exec",
                &self.namespaces[a],
                "ip",
                "route",
                "del",
                "blackhole",
                &target,
            ])?;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth pair in it; the bridge goes last.
        for ns in &self.namespaces {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
    }
}
