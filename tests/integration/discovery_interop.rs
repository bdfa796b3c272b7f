//! Interop with a third-party mDNS stack, Debian's avahi-daemon, both ways: avahi-browse
//! resolves a node's announcement with the right instance, host, address, port and TXT records
//! (and sees its goodbye); and a node finds and connects to a node that avahi-publish announces.
//!
//! Everything runs inside the test's private network namespace (see `discovery.rs`): a private
//! D-Bus daemon (avahi-daemon and its clients talk over D-Bus) listening on a socket in a
//! temporary directory, and avahi-daemon restricted to `lo`, IPv4 only, publishing nothing about
//! the host, in a mount namespace of its own whose `/run` is a fresh tmpfs (its pid file and
//! runtime directory never meet a system avahi). Every process is killed and reaped by its pid at
//! the end, and on a failure when its handle drops.
//!
//! Needs `dbus-daemon`, `avahi-daemon`, `avahi-browse`, `avahi-publish` (packages dbus-daemon,
//! avahi-daemon, avahi-utils; `.ci/run` installs them) and `unshare` (util-linux). Without them
//! the tests are skipped with a message, except in CI, where they fail.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use weft::discovery::SERVICE_TYPE_DEFAULT;
use weft::proto::frame::{PROTOCOL_VERSION_MAX, PROTOCOL_VERSION_MIN};
use weft::{Identity, Interfaces, MdnsConfig, Node, PeerEvent};

use crate::discovery::{
    assert_no_mdns_daemon_on_the_real_network, discovered, exchange_acknowledged_message,
    in_private_network, next_event, skip_unless_ci, within_discovery, DISCOVERY_WAIT,
};

/// How long the D-Bus and avahi daemons may take to be ready.
const DAEMON_START_WAIT: Duration = Duration::from_secs(10);

/// The programs the test runs, found in `PATH` or the usual system directories.
struct Programs {
    dbus_daemon: PathBuf,
    avahi_daemon: PathBuf,
    avahi_browse: PathBuf,
    avahi_publish: PathBuf,
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
                    "`{name}` is not installed (apt-get install -y --no-install-recommends \
                     dbus-daemon avahi-daemon avahi-utils util-linux, as .ci/run does)"
                )
            })
        };
        Ok(Self {
            dbus_daemon: find("dbus-daemon")?,
            avahi_daemon: find("avahi-daemon")?,
            avahi_browse: find("avahi-browse")?,
            avahi_publish: find("avahi-publish")?,
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

/// avahi-daemon on `lo` only, IPv4 only, without wide-area DNS-SD; `[publish]` follows.
const AVAHI_CONFIG: &str = "\
[server]
use-ipv4=yes
use-ipv6=no
allow-interfaces=lo
enable-dbus=yes
[wide-area]
enable-wide-area=no
[publish]
";

/// Browsing and resolving only.
const PUBLISH_NOTHING: &str = "disable-publishing=yes\n";

/// Publishing what clients ask for (avahi-publish), but nothing about this host.
const PUBLISH_ON_REQUEST: &str = "\
publish-addresses=no
publish-hinfo=no
publish-workstation=no
";

/// A private D-Bus daemon and an avahi-daemon on it, inside the test's network namespace.
struct Avahi {
    dir: TempDir,
    bus_address: String,
    bus: Process,
    daemon: Process,
    /// avahi-daemon's log (stderr), for diagnostics.
    log: Lines,
}

impl Avahi {
    /// Starts both daemons and waits until avahi is ready. `publish` is the `[publish]` section.
    async fn start(programs: &Programs, publish: &str) -> Self {
        let dir = TempDir::new();
        let socket = dir.0.join("bus");
        let bus_address = format!("unix:path={}", socket.display());
        std::fs::write(dir.0.join("bus.conf"), bus_config(&socket)).unwrap();
        let avahi_config = dir.0.join("avahi-daemon.conf");
        std::fs::write(&avahi_config, format!("{AVAHI_CONFIG}{publish}")).unwrap();

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
        let mut daemon = Process::spawn(
            "avahi-daemon",
            tokio::process::Command::new(&programs.unshare)
                .args(["--mount", "--propagation", "private", "sh", "-c"])
                .arg(r#"mount -t tmpfs weft-test /run && exec "$0" --no-drop-root --no-chroot --no-rlimits -f "$1""#)
                .arg(&programs.avahi_daemon)
                .arg(&avahi_config)
                .env("DBUS_SYSTEM_BUS_ADDRESS", &bus_address)
                .stdout(Stdio::null())
                .stderr(Stdio::piped()),
        );
        let log = daemon.take_stderr();
        log.wait_for("avahi-daemon's startup", DAEMON_START_WAIT, &bus_log, |l| {
            l.contains("Server startup complete")
        })
        .await;
        Self {
            dir,
            bus_address,
            bus,
            daemon,
            log,
        }
    }

    /// A client of this avahi (avahi-browse, avahi-publish), with its stdout and stderr.
    fn client(&self, name: &'static str, program: &Path, args: &[&str]) -> (Process, Lines, Lines) {
        let mut client = Process::spawn(
            name,
            tokio::process::Command::new(program)
                .args(args)
                .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus_address)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped()),
        );
        let out = client.take_stdout();
        let errors = client.take_stderr();
        (client, out, errors)
    }

    async fn stop(self) {
        self.daemon.stop().await;
        self.bus.stop().await;
        drop(self.dir);
    }
}

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
        let avahi = Avahi::start(&programs, PUBLISH_NOTHING).await;

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

        let (browse, browsed, _) = avahi.client(
            "avahi-browse",
            &programs.avahi_browse,
            &["--resolve", "--parsable", "--no-db-lookup", "_weft._udp"],
        );
        let line = browsed
            .wait_for(
                "avahi resolving the node",
                DISCOVERY_WAIT,
                &avahi.log,
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
                &avahi.log,
                |l| l == removed,
            )
            .await;

        browse.stop().await;
        avahi.stop().await;
    });
}

/// The other way round: a node announced by avahi (avahi-publish: an address record and a
/// `_weft._udp` service with the TXT records) is found by our browser, which connects to it.
#[test]
fn a_node_connects_to_a_node_announced_by_avahi() {
    let programs = match Programs::find() {
        Ok(programs) => programs,
        Err(why) => return skip_unless_ci(&why),
    };
    in_private_network(move || async move {
        crate::support::init_tracing();
        let avahi = Avahi::start(&programs, PUBLISH_ON_REQUEST).await;
        // The announced node has no mDNS of its own: avahi speaks for it.
        let announced = crate::support::node("shop").await;
        let id = announced.id().to_string();
        let port = announced.local_addr().unwrap().port().to_string();
        let host = "weft-announced.local";
        let (address, _, address_said) = avahi.client(
            "avahi-publish (address)",
            &programs.avahi_publish,
            &["--address", "--no-reverse", host, "127.0.0.1"],
        );
        let txt_id = format!("id={id}");
        let txt_versions = format!("v={PROTOCOL_VERSION_MIN}-{PROTOCOL_VERSION_MAX}");
        let (service, _, service_said) = avahi.client(
            "avahi-publish (service)",
            &programs.avahi_publish,
            &[
                "--service",
                "--host",
                host,
                &id,
                "_weft._udp",
                &port,
                &txt_id,
                "mesh=shop",
                &txt_versions,
            ],
        );
        // avahi-publish reports on stderr once avahi has probed and announced the record.
        for (what, out) in [
            ("the address", &address_said),
            ("the service", &service_said),
        ] {
            out.wait_for(what, DISCOVERY_WAIT, &avahi.log, |l| {
                l.starts_with("Established under name")
            })
            .await;
        }

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
        let mut events = node.events();
        assert_no_mdns_daemon_on_the_real_network();
        within_discovery(
            "connected to the node avahi announced",
            node.connected(announced.id()),
        )
        .await
        .unwrap();
        eprintln!(
            "interop: node start → connected to the node avahi announced in {:?}",
            started.elapsed()
        );
        let found = next_event(&mut events, "the announcement", |e| {
            discovered(e, announced.id())
        })
        .await;
        assert_eq!(
            found,
            PeerEvent::Discovered {
                peer: announced.id(),
                addrs: vec![announced.local_addr().unwrap()],
            }
        );
        exchange_acknowledged_message(&node, &announced).await;

        node.shutdown().await;
        announced.shutdown().await;
        service.stop().await;
        address.stop().await;
        avahi.stop().await;
    });
}
