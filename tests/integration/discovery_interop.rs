//! Interop with a third-party mDNS stack: Debian's avahi-daemon, browsed with avahi-browse,
//! resolves a node's announcement with the right instance, host, address, port and TXT records.
//!
//! Everything runs inside the test's private network namespace (see `discovery.rs`): a private
//! D-Bus daemon (avahi-daemon and avahi-browse talk over D-Bus) listening on a socket in a
//! temporary directory, and avahi-daemon restricted to `lo`, IPv4 only, publishing nothing, in a
//! mount namespace of its own whose `/run` is a fresh tmpfs (its pid file and runtime directory
//! never meet a system avahi). Every process is killed and reaped by its pid at the end, and on a
//! failure when its handle drops.
//!
//! Needs `dbus-daemon`, `avahi-daemon`, `avahi-browse` (packages dbus, avahi-daemon, avahi-utils;
//! `.ci/run` installs them) and `unshare` (util-linux). Without them the test is skipped with a
//! message, except in CI, where it fails.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use weft::discovery::SERVICE_TYPE_DEFAULT;
use weft::proto::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use weft::{Identity, Interfaces, MdnsConfig, Node};

use crate::discovery::{
    assert_no_mdns_daemon_on_the_real_network, in_private_network, skip_unless_ci, DISCOVERY_WAIT,
};

/// How long the D-Bus and avahi daemons may take to be ready.
const DAEMON_START_WAIT: Duration = Duration::from_secs(10);

/// The programs the test runs, found in `PATH` or the usual system directories.
struct Programs {
    dbus_daemon: PathBuf,
    avahi_daemon: PathBuf,
    avahi_browse: PathBuf,
    unshare: PathBuf,
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

impl Programs {
    fn find() -> Result<Self, String> {
        let find = |name: &str| {
            find_program(name).ok_or_else(|| {
                format!(
                    "`{name}` is not installed (apt-get install -y dbus avahi-daemon avahi-utils \
                     util-linux, as .ci/run does)"
                )
            })
        };
        Ok(Self {
            dbus_daemon: find("dbus-daemon")?,
            avahi_daemon: find("avahi-daemon")?,
            avahi_browse: find("avahi-browse")?,
            unshare: find("unshare")?,
        })
    }
}

/// A directory for the test's config files and the bus socket, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let salt = Identity::generate().expect("identity").node_id().short();
        let dir = std::env::temp_dir().join(format!("weft-avahi-{}-{salt}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the temporary directory");
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Lines read from a process's output as they come, for waiting on and for diagnostics.
#[derive(Clone, Default)]
struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    fn collect(reader: impl AsyncRead + Unpin + Send + 'static) -> Self {
        let lines = Self::default();
        let sink = lines.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(reader).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                sink.0.lock().unwrap().push(line);
            }
        });
        lines
    }

    fn text(&self) -> String {
        self.0.lock().unwrap().join("\n")
    }

    /// The first line `matches` accepts, waiting up to `wait`; on timeout the test fails with
    /// these lines and `context`.
    async fn wait_for(
        &self,
        what: &str,
        wait: Duration,
        context: &Lines,
        matches: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + wait;
        loop {
            if let Some(line) = self.0.lock().unwrap().iter().find(|l| matches(l)) {
                return line.clone();
            }
            if Instant::now() >= deadline {
                panic!(
                    "timed out after {wait:?} waiting for {what}\n--- output:\n{}\n--- context:\n{}",
                    self.text(),
                    context.text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A process the test started. [`Process::stop`] kills (SIGKILL, by pid) and reaps it; dropping
/// the handle on a failure path kills it too (`kill_on_drop`).
struct Process {
    name: &'static str,
    child: tokio::process::Child,
}

impl Process {
    fn spawn(name: &'static str, command: &mut tokio::process::Command) -> Self {
        let child = command
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        Self { name, child }
    }

    fn take_stdout(&mut self) -> Lines {
        Lines::collect(self.child.stdout.take().expect("stdout piped"))
    }

    fn take_stderr(&mut self) -> Lines {
        Lines::collect(self.child.stderr.take().expect("stderr piped"))
    }

    async fn stop(mut self) {
        let _ = self.child.start_kill();
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
            .await
            .is_err()
        {
            panic!("{} (pid {:?}) did not exit", self.name, self.child.id());
        }
    }
}

/// A D-Bus bus of the test's own, on a socket in `dir`, that lets everyone own and call anything.
fn bus_config(socket: &Path) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#,
        socket.display()
    )
}

/// avahi-daemon on `lo` only, IPv4 only, browsing and resolving but publishing nothing.
const AVAHI_CONFIG: &str = "\
[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces=lo
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
disable-publishing=yes
";

/// One resolved service line of `avahi-browse --parsable --resolve`:
/// `=;IFACE;PROTO;NAME;TYPE;DOMAIN;HOST;ADDRESS;PORT;"TXT" "TXT"...`.
#[derive(Debug)]
struct Resolved {
    interface: String,
    protocol: String,
    name: String,
    service_type: String,
    domain: String,
    host: String,
    address: String,
    port: u16,
    txt: Vec<String>,
}

impl Resolved {
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.splitn(10, ';').collect();
        let [kind, interface, protocol, name, service_type, domain, host, address, port, txt] =
            fields[..]
        else {
            return None;
        };
        if kind != "=" {
            return None;
        }
        // Records are double-quoted and separated by spaces; our values have no quotes.
        let mut txt: Vec<String> = txt
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect();
        txt.sort();
        Some(Self {
            interface: interface.into(),
            protocol: protocol.into(),
            name: name.into(),
            service_type: service_type.into(),
            domain: domain.into(),
            host: host.into(),
            address: address.into(),
            port: port.parse().ok()?,
            txt,
        })
    }
}

/// avahi (a third-party mDNS stack) resolves a node's announcement of the default service type
/// `_weft._udp`: instance and host named by the node id, its address and port, and exactly the
/// TXT records `id`, `mesh` and `v`; and it sees the goodbye when the node shuts down.
#[test]
fn avahi_resolves_a_nodes_announcement_with_its_port_and_txt_records() {
    let programs = match Programs::find() {
        Ok(programs) => programs,
        Err(why) => return skip_unless_ci(&why),
    };
    in_private_network(move || async move {
        crate::support::init_tracing();
        let dir = TempDir::new();
        let socket = dir.0.join("bus");
        let bus_address = format!("unix:path={}", socket.display());
        std::fs::write(dir.0.join("bus.conf"), bus_config(&socket)).unwrap();
        let avahi_config = dir.0.join("avahi-daemon.conf");
        std::fs::write(&avahi_config, AVAHI_CONFIG).unwrap();

        let mut bus = Process::spawn(
            "dbus-daemon",
            tokio::process::Command::new(&programs.dbus_daemon)
                .arg(format!(
                    "--config-file={}",
                    dir.0.join("bus.conf").display()
                ))
                .args(["--nofork", "--print-address=1"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let bus_out = bus.take_stdout();
        let bus_log = bus.take_stderr();
        // It prints its address once it listens.
        bus_out
            .wait_for("the D-Bus daemon", DAEMON_START_WAIT, &bus_log, |l| {
                l.starts_with("unix:")
            })
            .await;

        // A mount namespace of its own with a fresh /run: avahi keeps its pid file there.
        let mut avahi = Process::spawn(
            "avahi-daemon",
            tokio::process::Command::new(&programs.unshare)
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount -t tmpfs weft-test /run && exec "$0" --no-drop-root --no-chroot --no-rlimits -f "$1""#)
                .arg(&programs.avahi_daemon)
                .arg(&avahi_config)
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus_address)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let avahi_out = avahi.take_stdout();
        let avahi_log = avahi.take_stderr();
        avahi_log
            .wait_for(
                "avahi-daemon's startup",
                DAEMON_START_WAIT,
                &avahi_out,
                |l| l.contains("Server startup complete"),
            )
            .await;

        let started = Instant::now();
        let node = Node::builder()
            .mesh("shop")
            .identity(Identity::generate().expect("identity"))
            .bind("127.0.0.1:0".parse().unwrap())
            .discovery_mdns(MdnsConfig {
                interfaces: Interfaces::LoopbackOnly,
                service_type: SERVICE_TYPE_DEFAULT.into(),
            })
            .start()
            .await
            .expect("node starts");
        assert_no_mdns_daemon_on_the_real_network();
        let id = node.id().to_string();
        let port = node.local_addr().unwrap().port();

        let mut browse = Process::spawn(
            "avahi-browse",
            tokio::process::Command::new(&programs.avahi_browse)
                .args(["--resolve", "--parsable", "--no-db-lookup", "_weft._udp"])
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus_address)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let browsed = browse.take_stdout();
        let browse_log = browse.take_stderr();
        let line = browsed
            .wait_for(
                "avahi resolving the node",
                DISCOVERY_WAIT,
                &avahi_log,
                |l| Resolved::parse(l).is_some_and(|r| r.name == id),
            )
            .await;
        eprintln!(
            "interop: node start → resolved by avahi in {:?}",
            started.elapsed()
        );
        let resolved = Resolved::parse(&line).unwrap();
        assert_eq!(resolved.interface, "lo", "{line}");
        assert_eq!(resolved.protocol, "IPv4", "{line}");
        assert_eq!(resolved.service_type, "_weft._udp", "{line}");
        assert_eq!(resolved.domain, "local", "{line}");
        assert_eq!(resolved.host, format!("{id}.local"), "{line}");
        assert_eq!(resolved.address, "127.0.0.1", "{line}");
        assert_eq!(resolved.port, port, "{line}");
        let mut expected = vec![
            format!("id={id}"),
            "mesh=shop".to_owned(),
            format!("v={PROTOCOL_VERSION_MIN}-{PROTOCOL_VERSION_MAX}"),
        ];
        expected.sort();
        assert_eq!(resolved.txt, expected, "{line}");

        // The goodbye on shutdown reaches avahi too.
        node.shutdown().await;
        let removed = format!("-;lo;IPv4;{id};_weft._udp;local");
        browsed
            .wait_for(
                "avahi seeing the goodbye",
                DISCOVERY_WAIT,
                &browse_log,
                |l| l == removed,
            )
            .await;

        browse.stop().await;
        avahi.stop().await;
        bus.stop().await;
        drop(dir);
    });
}
