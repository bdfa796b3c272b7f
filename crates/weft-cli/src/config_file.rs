//! `weft node`'s settings: from flags, from a TOML file (`--config FILE`), or both.
//!
//! The file holds the same settings as the flags, named like them with `_` for `-` (lists in the
//! plural: `peers`, `seeds`, `mdns_interfaces`); `examples/node.toml` shows each one. A flag given
//! on the command line wins over the file (a repeated flag replaces the file's whole list), and
//! the built-in defaults fill in what neither gives. Relative paths in the file are relative to
//! the file's directory, so a file means the same from wherever it is run. Unknown keys are
//! errors, so a misspelt setting is never silently ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer};
use weft::NodeAddr;

/// UDP address a node listens on when neither a flag nor the file says.
pub const BIND_DEFAULT: &str = "0.0.0.0:7450";
/// Mesh a node joins when neither a flag nor the file says.
pub const MESH_DEFAULT: &str = "default";

/// The flags of `weft node`. Every setting is optional here: it may come from `--config`.
#[derive(clap::Args, Debug, Default)]
pub struct NodeArgs {
    /// Read the settings from this TOML file (see examples/node.toml); flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The node's data directory (identity). Needed here or in the config file.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// UDP address to listen on [default: 0.0.0.0:7450].
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// Mesh name; nodes of other meshes are refused [default: default].
    #[arg(long)]
    pub mesh: Option<String>,
    /// Peers to connect to, as NODE_ID@IP:PORT.
    #[arg(long = "peer")]
    pub peers: Vec<NodeAddr>,
    /// Addresses of nodes whose ids you do not know (networks without multicast).
    #[arg(long = "seed")]
    pub seeds: Vec<SocketAddr>,
    /// Serve `/metrics` (Prometheus) and `/status` (JSON) over HTTP on this address.
    #[arg(long)]
    pub metrics: Option<SocketAddr>,
    /// File holding the mesh secret: peers must prove they know it (it is never sent).
    #[arg(long)]
    pub secret_file: Option<PathBuf>,
    /// Find and announce nodes with mDNS (on every interface unless --mdns-interface).
    #[arg(long)]
    pub mdns: bool,
    /// Restrict mDNS to this interface (repeatable; `lo` for loopback only). Implies --mdns.
    #[arg(long = "mdns-interface")]
    pub mdns_interfaces: Vec<String>,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub run_secs: Option<u64>,
}

/// A `weft node` config file: the settings of [`NodeArgs`], each optional.
#[derive(Deserialize, Debug, Default, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NodeFile {
    data_dir: Option<PathBuf>,
    bind: Option<Parsed<SocketAddr>>,
    mesh: Option<String>,
    #[serde(default)]
    peers: Vec<Parsed<NodeAddr>>,
    #[serde(default)]
    seeds: Vec<Parsed<SocketAddr>>,
    metrics: Option<Parsed<SocketAddr>>,
    secret_file: Option<PathBuf>,
    mdns: Option<bool>,
    #[serde(default)]
    mdns_interfaces: Vec<String>,
    run_secs: Option<u64>,
}

/// What `weft node` runs with, once flags, file and defaults are merged.
#[derive(Debug, PartialEq)]
pub struct NodeSettings {
    pub data_dir: PathBuf,
    pub bind: SocketAddr,
    pub mesh: String,
    pub peers: Vec<NodeAddr>,
    pub seeds: Vec<SocketAddr>,
    pub metrics: Option<SocketAddr>,
    pub secret_file: Option<PathBuf>,
    /// `None`: no mDNS discovery.
    pub mdns: Option<weft::MdnsConfig>,
    pub run_secs: Option<u64>,
}

/// A value written as a string in the file and parsed with its `FromStr` (addresses, node
/// addresses), so a bad one is reported with the parser's explanation and the file position.
#[derive(Debug, PartialEq)]
struct Parsed<T>(T);

impl<'de, T> Deserialize<'de> for Parsed<T>
where
    T: FromStr + Describe,
    T::Err: std::fmt::Display,
{
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map(Parsed)
            .map_err(|e| serde::de::Error::custom(format!("{text:?} is not {}: {e}", T::EXPECTED)))
    }
}

/// What a [`Parsed`] value looks like, for error messages.
trait Describe {
    const EXPECTED: &'static str;
}

impl Describe for SocketAddr {
    const EXPECTED: &'static str = "an IP:PORT address (e.g. \"127.0.0.1:7450\")";
}

impl Describe for NodeAddr {
    const EXPECTED: &'static str = "a node address NODE_ID@IP:PORT (as `weft listen` prints it)";
}

impl NodeFile {
    /// Reads and checks a config file; relative paths in it become relative to its directory.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "cannot read the config file {} (check the path given to --config)",
                path.display()
            )
        })?;
        let mut file = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new(""));
        for dir in [&mut file.data_dir, &mut file.secret_file]
            .into_iter()
            .flatten()
        {
            if dir.is_relative() {
                *dir = base.join(&*dir);
            }
        }
        Ok(file)
    }

    /// Parses the text of the config file at `path` (named in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let file: Self =
            toml::from_str(text).map_err(|e| anyhow::anyhow!(describe(path, text, &e)))?;
        if file.mdns == Some(false) && !file.mdns_interfaces.is_empty() {
            bail!(
                "{}: `mdns = false` contradicts `mdns_interfaces` (which turns mDNS on): remove one of them",
                path.display()
            );
        }
        Ok(file)
    }
}

/// One sentence for a TOML error: file, line and column, the setting, toml's explanation and
/// what to do.
fn describe(path: &Path, text: &str, error: &toml::de::Error) -> String {
    let message = error.message().trim_end_matches('.');
    let Some(span) = error.span() else {
        return format!(
            "{}: {message}; correct the file (examples/node.toml shows every setting)",
            path.display()
        );
    };
    let start = span.start.min(text.len());
    let before = &text[..start];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before[line_start..].chars().count() + 1;
    // The setting: the nearest `key =` at or above the error (a list may span several lines).
    let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
    let setting = text[..line_end]
        .lines()
        .rev()
        .find_map(|l| {
            let (key, _) = l.split_once('=')?;
            let key = key.trim();
            (!key.is_empty() && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
                .then_some(key)
        })
        .map(|key| format!(" (`{key}`)"))
        .unwrap_or_default();
    format!(
        "{} line {line}, column {column}{setting}: {message}; correct that line \
         (`weft node --help` lists the settings, examples/node.toml shows each one)",
        path.display()
    )
}

impl NodeArgs {
    /// The settings to run with: these flags over the `--config` file over the defaults.
    pub fn resolve(self) -> Result<NodeSettings> {
        let file = match &self.config {
            Some(path) => NodeFile::load(path)?,
            None => NodeFile::default(),
        };
        self.merge(file)
    }

    /// Merges the flags (winning) with an already loaded file.
    fn merge(self, file: NodeFile) -> Result<NodeSettings> {
        let Some(data_dir) = self.data_dir.or(file.data_dir) else {
            match &self.config {
                Some(path) => bail!(
                    "no data directory: set `data_dir` in {} or pass --data-dir DIR",
                    path.display()
                ),
                None => bail!(
                    "no data directory: pass --data-dir DIR (or --config FILE with `data_dir`)"
                ),
            }
        };
        let bind = match self.bind.or(file.bind.map(|b| b.0)) {
            Some(bind) => bind,
            None => BIND_DEFAULT
                .parse()
                .expect("the default bind address parses"),
        };
        let mesh = self
            .mesh
            .or(file.mesh)
            .unwrap_or_else(|| MESH_DEFAULT.to_owned());
        let peers = flags_or_file(self.peers, file.peers);
        let seeds = flags_or_file(self.seeds, file.seeds);
        let interfaces = if self.mdns_interfaces.is_empty() {
            file.mdns_interfaces
        } else {
            self.mdns_interfaces
        };
        let mdns_on = self.mdns || file.mdns == Some(true) || !interfaces.is_empty();
        let mdns = mdns_on.then(|| weft::MdnsConfig {
            interfaces: crate::mdns_interfaces_from(&interfaces),
            ..Default::default()
        });
        Ok(NodeSettings {
            data_dir,
            bind,
            mesh,
            peers,
            seeds,
            metrics: self.metrics.or(file.metrics.map(|m| m.0)),
            secret_file: self.secret_file.or(file.secret_file),
            mdns,
            run_secs: self.run_secs.or(file.run_secs),
        })
    }
}

/// A list given by flags replaces the file's.
fn flags_or_file<T>(flags: Vec<T>, file: Vec<Parsed<T>>) -> Vec<T> {
    if flags.is_empty() {
        file.into_iter().map(|p| p.0).collect()
    } else {
        flags
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use weft::Interfaces;

    #[derive(Parser, Debug)]
    struct Flags {
        #[command(flatten)]
        node: NodeArgs,
    }

    fn flags(args: &[&str]) -> NodeArgs {
        Flags::try_parse_from(std::iter::once("weft-node").chain(args.iter().copied()))
            .expect("flags parse")
            .node
    }

    fn parse(text: &str) -> Result<NodeFile> {
        NodeFile::parse(text, Path::new("node.toml"))
    }

    fn id() -> String {
        weft::NodeId::from_bytes([7; 32]).to_string()
    }

    fn full() -> String {
        let id = id();
        format!(
            r#"
data_dir = "/var/lib/weft"
bind = "127.0.0.1:7460"
mesh = "shop"
peers = ["{id}@10.0.0.7:7450"]
seeds = ["10.0.0.8:7450", "10.0.0.9:7450"]
metrics = "127.0.0.1:9460"
secret_file = "/etc/weft/secret"
mdns = true
mdns_interfaces = ["lo"]
run_secs = 30
"#
        )
    }

    #[test]
    fn a_full_file_parses_into_the_settings() {
        let file = parse(&full()).unwrap();
        let settings = NodeArgs::default().merge(file).unwrap();
        assert_eq!(
            settings,
            NodeSettings {
                data_dir: "/var/lib/weft".into(),
                bind: "127.0.0.1:7460".parse().unwrap(),
                mesh: "shop".into(),
                peers: vec![format!("{}@10.0.0.7:7450", id()).parse().unwrap()],
                seeds: vec![
                    "10.0.0.8:7450".parse().unwrap(),
                    "10.0.0.9:7450".parse().unwrap()
                ],
                metrics: Some("127.0.0.1:9460".parse().unwrap()),
                secret_file: Some("/etc/weft/secret".into()),
                mdns: Some(weft::MdnsConfig {
                    interfaces: Interfaces::LoopbackOnly,
                    ..Default::default()
                }),
                run_secs: Some(30),
            }
        );
    }

    #[test]
    fn the_example_file_parses_and_keeps_mdns_on_loopback() {
        let text = include_str!("../../../examples/node.toml");
        let file = NodeFile::parse(text, Path::new("examples/node.toml")).unwrap();
        let settings = NodeArgs::default().merge(file).unwrap();
        assert_eq!(
            settings.mdns.expect("the example turns mDNS on").interfaces,
            Interfaces::LoopbackOnly,
            "an example must never announce on the real network"
        );
        assert!(settings.bind.ip().is_loopback());
    }

    #[test]
    fn an_unknown_key_is_rejected_by_name_with_its_line() {
        let error = parse("mesh = \"shop\"\nmdns_interface = [\"lo\"]\n")
            .unwrap_err()
            .to_string();
        assert!(error.contains("node.toml line 2, column 1"), "{error}");
        assert!(error.contains("unknown field `mdns_interface`"), "{error}");
        assert!(
            error.contains("`mdns_interfaces`"),
            "the valid keys are listed: {error}"
        );
        assert!(!error.contains('\n'), "one line: {error}");
    }

    #[test]
    fn a_bad_address_is_rejected_with_its_setting_and_the_expected_form() {
        let error = parse("mesh = \"shop\"\nbind = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("node.toml line 2, column 8 (`bind`)"),
            "{error}"
        );
        assert!(
            error.contains("\"localhost\" is not an IP:PORT address"),
            "{error}"
        );
        let error = parse(&format!("peers = [\n  \"{}@nowhere\",\n]\n", id()))
            .unwrap_err()
            .to_string();
        // toml places errors inside a list at the list; the message quotes the bad element.
        assert!(
            error.contains("node.toml line 1, column 9 (`peers`)"),
            "{error}"
        );
        assert!(
            error.contains("@nowhere\" is not a node address NODE_ID@IP:PORT"),
            "{error}"
        );
        let error = parse("seeds = [\"10.0.0.1\"]").unwrap_err().to_string();
        assert!(error.contains("(`seeds`)"), "{error}");
    }

    #[test]
    fn wrong_types_and_syntax_errors_name_the_line() {
        let error = parse("run_secs = \"ten\"").unwrap_err().to_string();
        assert!(error.contains("line 1, column 12 (`run_secs`)"), "{error}");
        let error = parse("mesh = \"shop").unwrap_err().to_string();
        assert!(error.contains("node.toml line 1"), "{error}");
        let error = parse("mdns = false\nmdns_interfaces = [\"lo\"]")
            .unwrap_err()
            .to_string();
        assert!(error.contains("contradicts"), "{error}");
    }

    #[test]
    fn flags_override_the_file() {
        let file = parse(&full()).unwrap();
        let settings = flags(&[
            "--config",
            "node.toml",
            "--bind",
            "127.0.0.1:9999",
            "--mesh",
            "bank",
            "--seed",
            "10.0.0.1:1",
            "--mdns-interface",
            "eth1",
            "--run-secs",
            "5",
        ])
        .merge(file)
        .unwrap();
        assert_eq!(settings.bind, "127.0.0.1:9999".parse().unwrap());
        assert_eq!(settings.mesh, "bank");
        assert_eq!(settings.seeds, vec!["10.0.0.1:1".parse().unwrap()]);
        assert_eq!(
            settings.mdns.unwrap().interfaces,
            Interfaces::Named(vec!["eth1".into()])
        );
        assert_eq!(settings.run_secs, Some(5));
        // What no flag gave comes from the file.
        assert_eq!(settings.data_dir, PathBuf::from("/var/lib/weft"));
        assert_eq!(settings.metrics, Some("127.0.0.1:9460".parse().unwrap()));
        assert_eq!(settings.peers.len(), 1);
    }

    #[test]
    fn defaults_fill_in_and_a_data_dir_is_required() {
        let settings = flags(&["--data-dir", "/tmp/x"])
            .merge(NodeFile::default())
            .unwrap();
        assert_eq!(settings.bind, BIND_DEFAULT.parse().unwrap());
        assert_eq!(settings.mesh, MESH_DEFAULT);
        assert_eq!(settings.mdns, None);
        let error = flags(&["--config", "node.toml"])
            .merge(parse("mesh = \"shop\"").unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("set `data_dir` in node.toml or pass --data-dir"),
            "{error}"
        );
    }

    #[test]
    fn relative_paths_in_the_file_are_relative_to_its_directory() {
        let dir = std::env::temp_dir().join(format!("weft-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("node.toml");
        std::fs::write(
            &path,
            "data_dir = \"var/a\"\nsecret_file = \"/abs/secret\"\n",
        )
        .unwrap();
        let loaded = NodeFile::load(&path);
        std::fs::remove_dir_all(&dir).unwrap();
        let file = loaded.unwrap();
        assert_eq!(file.data_dir, Some(dir.join("var/a")));
        assert_eq!(file.secret_file, Some(PathBuf::from("/abs/secret")));
        let error = NodeFile::load(&dir.join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(error.contains("cannot read the config file"), "{error}");
    }
}
