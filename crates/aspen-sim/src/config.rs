//! What one simulation run does: its seed, its faults, its workload. Plain data, shared by
//! the runner, the artifacts and the replay command.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

/// Most simulated clients.
pub const MAX_CLIENTS: usize = 32;
/// Most keys in the workload's key space.
pub const MAX_KEYS: usize = 64;
/// Longest simulated workload, in seconds.
pub const MAX_SIM_SECS: u64 = 3600;

/// A fault the simulator can inject; each is switched on or off per run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Messages (requests and replies) are lost.
    Drop,
    /// Some messages are held back for up to a second.
    Delay,
    /// Some requests are delivered twice.
    Duplicate,
    /// Wide latency spread, so messages overtake each other.
    Reorder,
    /// The nodes split into two groups that cannot talk; later healed.
    Partition,
    /// Links that carry messages one way only; later healed.
    OneWay,
    /// A node is killed and restarted from its files; half the time as an OS crash (a new
    /// boot, and its unsynced SQLite writes damaged), which must rebuild its state machine.
    Crash,
    /// A node stops running for a while, then resumes.
    Pause,
    /// A node's timers run fast or slow.
    ClockSkew,
    /// Voters are swapped out and back in (a 4th node exists for it).
    Membership,
    /// Frequent snapshots and log purges, so lagging nodes install snapshots.
    Snapshot,
    /// Some replies are lost after the request was handled (a write applied, its client
    /// never told), so clients resend writes that took effect.
    LostReply,
}

impl Fault {
    /// Every fault.
    pub const ALL: [Fault; 12] = [
        Fault::Drop,
        Fault::Delay,
        Fault::Duplicate,
        Fault::Reorder,
        Fault::Partition,
        Fault::OneWay,
        Fault::Crash,
        Fault::Pause,
        Fault::ClockSkew,
        Fault::Membership,
        Fault::Snapshot,
        Fault::LostReply,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Drop => "drop",
            Fault::Delay => "delay",
            Fault::Duplicate => "duplicate",
            Fault::Reorder => "reorder",
            Fault::Partition => "partition",
            Fault::OneWay => "one-way",
            Fault::Crash => "crash",
            Fault::Pause => "pause",
            Fault::ClockSkew => "clock-skew",
            Fault::Membership => "membership",
            Fault::Snapshot => "snapshot",
            Fault::LostReply => "lost-reply",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault list that could not be parsed.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A fault name is unknown.
    #[error("unknown fault {0:?}; known: all, none, {known}", known = known_faults())]
    UnknownFault(String),
    /// A setting is outside its limit.
    #[error("{name} = {value} is outside 1..={max}")]
    OutOfRange {
        /// The setting.
        name: &'static str,
        /// The value given.
        value: u64,
        /// The limit.
        max: u64,
    },
}

fn known_faults() -> String {
    Fault::ALL.iter().map(|fault| fault.name()).collect::<Vec<_>>().join(", ")
}

/// Parses `all`, `none`, or a comma-separated list of fault names.
pub fn parse_faults(spec: &str) -> Result<BTreeSet<Fault>, ConfigError> {
    let mut faults = BTreeSet::new();
    for name in spec.split(',').map(str::trim).filter(|name| !name.is_empty()) {
        match name {
            "all" => faults.extend(Fault::ALL),
            "none" => {}
            _ => {
                let fault = Fault::ALL
                    .into_iter()
                    .find(|fault| fault.name() == name)
                    .ok_or_else(|| ConfigError::UnknownFault(name.to_string()))?;
                faults.insert(fault);
            }
        }
    }
    Ok(faults)
}

/// The canonical text of a fault set, as `parse_faults` accepts it.
pub fn faults_to_string(faults: &BTreeSet<Fault>) -> String {
    if faults.is_empty() {
        return "none".into();
    }
    if faults.len() == Fault::ALL.len() {
        return "all".into();
    }
    faults.iter().map(|fault| fault.name()).collect::<Vec<_>>().join(",")
}

/// One run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimConfig {
    /// The seed: with the rest of this config, it fixes the whole execution.
    pub seed: u64,
    /// Faults injected.
    pub faults: BTreeSet<Fault>,
    /// Simulated seconds of workload (healing and convergence come after).
    pub sim_secs: u64,
    /// Concurrent clients.
    pub clients: usize,
    /// Keys the clients share (few keys, many conflicts).
    pub keys: usize,
}

impl SimConfig {
    /// Checks the limits.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            ("secs", self.sim_secs, MAX_SIM_SECS),
            ("clients", self.clients as u64, MAX_CLIENTS as u64),
            ("keys", self.keys as u64, MAX_KEYS as u64),
        ];
        for (name, value, max) in checks {
            if value == 0 || value > max {
                return Err(ConfigError::OutOfRange { name, value, max });
            }
        }
        Ok(())
    }

    /// The command that replays this run.
    pub fn replay_command(&self, bug: Option<&str>) -> String {
        let bug = bug.map(|bug| format!(" --bug {bug}")).unwrap_or_default();
        format!(
            "cargo xtask sim --seed {} --faults {} --secs {} --clients {} --keys {}{bug}",
            self.seed,
            faults_to_string(&self.faults),
            self.sim_secs,
            self.clients,
            self.keys
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_lists_round_trip() {
        assert_eq!(parse_faults("all").map(|faults| faults.len()), Ok(Fault::ALL.len()));
        assert_eq!(parse_faults("none"), Ok(BTreeSet::new()));
        let some = parse_faults("crash, drop,one-way").expect("parses");
        assert_eq!(some, BTreeSet::from([Fault::Crash, Fault::Drop, Fault::OneWay]));
        assert_eq!(faults_to_string(&some), "drop,one-way,crash");
        assert_eq!(parse_faults(&faults_to_string(&some)), Ok(some));
        assert_eq!(faults_to_string(&parse_faults("all").expect("parses")), "all");
        assert_eq!(parse_faults("crash,flood"), Err(ConfigError::UnknownFault("flood".into())));
    }

    #[test]
    fn limits_are_checked() {
        let mut config = SimConfig { seed: 1, faults: BTreeSet::new(), sim_secs: 10, clients: 4, keys: 4 };
        assert_eq!(config.validate(), Ok(()));
        config.clients = MAX_CLIENTS + 1;
        assert!(matches!(config.validate(), Err(ConfigError::OutOfRange { name: "clients", .. })));
        config.clients = 4;
        config.sim_secs = 0;
        assert!(matches!(config.validate(), Err(ConfigError::OutOfRange { name: "secs", .. })));
    }

    #[test]
    fn replay_command_names_everything() {
        let config =
            SimConfig { seed: 42, faults: parse_faults("crash").expect("parses"), sim_secs: 5, clients: 2, keys: 3 };
        assert_eq!(
            config.replay_command(Some("stale-read")),
            "cargo xtask sim --seed 42 --faults crash --secs 5 --clients 2 --keys 3 --bug stale-read"
        );
    }
}
