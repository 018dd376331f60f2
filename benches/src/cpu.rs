//! CPU time per process over a timed part of a run, from `/proc`: each
//! process's user + system time (`/proc/<pid>/stat`, all its threads), and
//! the machine's busy time (`/proc/stat`), so what the processes measured do
//! not account for shows as others (another build, another benchmark).

use std::fmt;
use std::time::Instant;

/// A process to measure: its name in the report and its id (0 for this one).
#[derive(Debug, Clone)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl Watched {
    pub fn new(name: impl Into<String>, pid: u32) -> Self {
        Self { name: name.into(), pid }
    }

    /// This process (`/proc/self`).
    pub fn this(name: impl Into<String>) -> Self {
        Self::new(name, 0)
    }

    fn stat_path(&self) -> String {
        if self.pid == 0 {
            "/proc/self/stat".to_owned()
        } else {
            format!("/proc/{}/stat", self.pid)
        }
    }
}

/// CPU times read at the start of a timed part, to compare at its end.
#[derive(Debug)]
pub struct CpuProbe {
    began: Instant,
    machine: Option<MachineTicks>,
    procs: Vec<(Watched, Option<u64>)>,
    ticks_per_sec: f64,
}

/// What a timed part cost: each process's CPU time, and the machine's.
#[derive(Debug, Clone)]
pub struct CpuReport {
    pub wall_secs: f64,
    /// Per process, CPU seconds (`None`: it could not be read, e.g. it had
    /// exited).
    pub procs: Vec<(String, Option<f64>)>,
    /// Busy CPU seconds of the whole machine, all cores.
    pub machine_busy_secs: Option<f64>,
    pub cores: usize,
}

impl CpuProbe {
    /// Reads every process's and the machine's CPU time now.
    pub fn start(procs: Vec<Watched>) -> Self {
        let procs = procs
            .into_iter()
            .map(|w| {
                let t = process_ticks(&w.stat_path());
                (w, t)
            })
            .collect();
        Self {
            machine: machine_ticks(),
            began: Instant::now(),
            procs,
            ticks_per_sec: ticks_per_sec(),
        }
    }

    /// Reads them again: what each used since [`CpuProbe::start`].
    pub fn finish(self) -> CpuReport {
        let wall_secs = self.began.elapsed().as_secs_f64();
        let machine_end = machine_ticks();
        let tps = self.ticks_per_sec;
        let procs = self
            .procs
            .into_iter()
            .map(|(w, before)| {
                let after = process_ticks(&w.stat_path());
                let used = before.zip(after).map(|(b, a)| a.saturating_sub(b) as f64 / tps);
                (w.name, used)
            })
            .collect();
        let machine_busy_secs = self
            .machine
            .zip(machine_end)
            .map(|(b, a)| a.busy.saturating_sub(b.busy) as f64 / tps);
        CpuReport {
            wall_secs,
            procs,
            machine_busy_secs,
            cores: std::thread::available_parallelism().map_or(1, usize::from),
        }
    }
}

impl CpuReport {
    /// `secs` of CPU as a share of the wall time, in % of one core.
    fn share(&self, secs: f64) -> f64 {
        if self.wall_secs > 0.0 {
            100.0 * secs / self.wall_secs
        } else {
            0.0
        }
    }

    /// Each process's CPU time per unit of work (`units` orders or
    /// documents), in microseconds: the figure to compare across rates.
    pub fn per_unit<'a>(&'a self, units: usize, unit: &'a str) -> PerUnit<'a> {
        PerUnit {
            report: self,
            units,
            unit,
        }
    }

    /// Busy CPU the processes measured do not account for, in % of one core.
    pub fn others(&self) -> Option<f64> {
        let measured: f64 = self.procs.iter().filter_map(|(_, s)| *s).sum();
        self.machine_busy_secs
            .map(|busy| self.share((busy - measured).max(0.0)))
    }
}

impl fmt::Display for CpuReport {
    /// `cpu over 5.21 s (% of one core): nats-server 98 %, … others: 3 % (machine 185 % of 200 %)`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu over {:.2} s (% of one core):", self.wall_secs)?;
        for (name, secs) in &self.procs {
            match secs {
                Some(s) => write!(f, " {name} {:.0} %,", self.share(*s))?,
                None => write!(f, " {name} ?,")?,
            }
        }
        match (self.others(), self.machine_busy_secs) {
            (Some(o), Some(busy)) => write!(
                f,
                " others: {o:.0} % (machine busy {:.0} % of {} %)",
                self.share(busy),
                100 * self.cores
            ),
            _ => write!(f, " others: ? (no /proc/stat)"),
        }
    }
}

/// [`CpuReport::per_unit`].
#[derive(Debug)]
pub struct PerUnit<'a> {
    report: &'a CpuReport,
    units: usize,
    unit: &'a str,
}

impl fmt::Display for PerUnit<'_> {
    /// `cpu per order: nats-server 96 µs, payment-worker 25 µs, …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cpu per {}:", self.unit)?;
        let n = self.units.max(1) as f64;
        for (i, (name, secs)) in self.report.procs.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            match secs {
                Some(s) => write!(f, "{sep} {name} {:.0} µs", s * 1e6 / n)?,
                None => write!(f, "{sep} {name} ?")?,
            }
        }
        Ok(())
    }
}

/// utime + stime of a process, in clock ticks, from its `stat` file.
fn process_ticks(path: &str) -> Option<u64> {
    parse_process_ticks(&std::fs::read_to_string(path).ok()?)
}

/// The 14th and 15th fields (utime, stime) of a `/proc/<pid>/stat` line.
/// The second field, the command in parentheses, may hold spaces and
/// parentheses itself: the fields are counted after its last `)`.
fn parse_process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // state is field 3
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[derive(Debug, Clone, Copy)]
struct MachineTicks {
    busy: u64,
}

fn machine_ticks() -> Option<MachineTicks> {
    parse_machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)
}

/// Busy ticks of all cores from the `cpu` line of `/proc/stat`: user, nice,
/// system, irq, softirq and steal (guest time is inside user already; idle
/// and iowait are not busy).
fn parse_machine_ticks(stat: &str) -> Option<MachineTicks> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Some(MachineTicks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6) + at(7),
    })
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 on Linux unless told).
fn ticks_per_sec() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse::<f64>().ok())
        .filter(|t| *t > 0.0)
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_ticks_count_fields_after_the_command() {
        let stat = "4242 (inventory (w) x) S 1 4242 4242 0 -1 4194560 1 0 0 0 731 129 0 0 20 0 9 0 77 0 0";
        assert_eq!(parse_process_ticks(stat), Some(731 + 129));
        assert_eq!(parse_process_ticks("4242 (cut"), None);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  100 2 30 5000 40 5 6 7 0 0\ncpu0 50 1 15 2500 20 2 3 3 0 0\n";
        assert_eq!(
            parse_machine_ticks(stat).map(|m| m.busy),
            Some(100 + 2 + 30 + 5 + 6 + 7)
        );
    }

    #[test]
    fn this_process_is_measured() {
        let probe = CpuProbe::start(vec![Watched::this("client"), Watched::new("gone", u32::MAX)]);
        let report = probe.finish();
        assert!(report.procs[0].1.is_some());
        assert!(report.procs[1].1.is_none());
        assert!(report.to_string().contains("gone ?"));
    }

    #[test]
    fn cpu_per_unit_is_in_microseconds() {
        let report = CpuReport {
            wall_secs: 2.0,
            procs: vec![("nats-server".into(), Some(1.8)), ("client".into(), None)],
            machine_busy_secs: Some(3.0),
            cores: 2,
        };
        assert_eq!(
            report.per_unit(20_000, "order").to_string(),
            "cpu per order: nats-server 90 µs, client ?"
        );
        assert_eq!(
            report.to_string(),
            "cpu over 2.00 s (% of one core): nats-server 90 %, client ?, others: 60 % (machine busy 150 % of 200 %)"
        );
    }
}
