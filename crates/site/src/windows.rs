//! Send windows: when content may be sent to a target, and at what rate.
//!
//! A window is `DAYS HH:MM-HH:MM[@RATE]` in the server's local time zone: DAYS is
//! `daily`, a day (`mon` … `sun`), a range (`mon-fri`, `fri-mon`) or a comma-separated
//! list of those (`sat,sun`, `mon,wed-fri`); the times may wrap midnight (`22:00-06:00`
//! opens on each listed day at 22:00 and closes at 06:00 the next morning); equal times
//! mean the whole day. `RATE` is bytes per second (`2MiB`, `500KB`, `750000`). A target
//! with no window is always open; with windows, it is open while any of them is, at the
//! highest rate among the open ones (an open window without a rate: no window limit).

use std::fmt;

/// One window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Days it opens on: bit 0 Monday … bit 6 Sunday.
    days: u8,
    /// Minutes after local midnight.
    start: u16,
    end: u16,
    /// Bytes per second while open.
    rate: Option<u64>,
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const ALL_DAYS: u8 = 0x7f;
/// The lowest rate a window may set, as for a target's rate limit.
pub const MIN_RATE: u64 = 1024;

impl Window {
    /// Parses one window; the error says what is wrong and shows the form.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = |what: &str| {
            format!("window {spec:?}: {what}; use DAYS HH:MM-HH:MM[@RATE], e.g. \"mon-fri 22:00-06:00@2MiB\"")
        };
        let mut parts = spec.split_whitespace();
        let (Some(days), Some(times), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(bad("expected days and a time range"));
        };
        let days = parse_days(days).map_err(|e| bad(&e))?;
        let (times, rate) = match times.split_once('@') {
            Some((t, r)) => (t, Some(parse_rate(r).map_err(|e| bad(&e))?)),
            None => (times, None),
        };
        let (start, end) = times.split_once('-').ok_or_else(|| bad("the time range needs a '-'"))?;
        let start = parse_time(start).map_err(|e| bad(&e))?;
        let end = parse_time(end).map_err(|e| bad(&e))?;
        if start == 24 * 60 {
            return Err(bad("a window cannot start at 24:00"));
        }
        Ok(Self { days, start, end: end % (24 * 60), rate })
    }

    /// Whether the window is open at `minute` of local weekday `day` (0 Monday), and
    /// its rate.
    fn open_at(&self, day: usize, minute: u16) -> bool {
        let on = |d: usize| self.days & (1 << d) != 0;
        let yesterday = (day + 6) % 7;
        match self.start.cmp(&self.end) {
            std::cmp::Ordering::Equal => on(day),
            std::cmp::Ordering::Less => on(day) && (self.start..self.end).contains(&minute),
            std::cmp::Ordering::Greater => (on(day) && minute >= self.start) || (on(yesterday) && minute < self.end),
        }
    }
}

impl fmt::Display for Window {
    /// The canonical form: every listed day, times, and the rate in bytes per second.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days == ALL_DAYS {
            f.write_str("daily")?;
        } else {
            let names: Vec<&str> = (0..7).filter(|d| self.days & (1 << d) != 0).map(|d| DAY_NAMES[d]).collect();
            f.write_str(&names.join(","))?;
        }
        let hm = |m: u16| format!("{:02}:{:02}", m / 60, m % 60);
        let end = if self.end == 0 && self.start != 0 { "24:00".to_owned() } else { hm(self.end) };
        write!(f, " {}-{end}", hm(self.start))?;
        if let Some(r) = self.rate {
            write!(f, "@{r}")?;
        }
        Ok(())
    }
}

fn parse_day(s: &str) -> Result<usize, String> {
    let lower = s.to_ascii_lowercase();
    DAY_NAMES
        .iter()
        .position(|d| lower.len() >= 3 && (lower == *d || full_day_name(d) == lower))
        .ok_or_else(|| format!("{s:?} is not a day (mon, tue, … sun)"))
}

fn full_day_name(short: &str) -> &'static str {
    match short {
        "mon" => "monday",
        "tue" => "tuesday",
        "wed" => "wednesday",
        "thu" => "thursday",
        "fri" => "friday",
        "sat" => "saturday",
        _ => "sunday",
    }
}

fn parse_days(s: &str) -> Result<u8, String> {
    let mut days = 0u8;
    for part in s.split(',') {
        let part = part.trim();
        days |= match part.to_ascii_lowercase().as_str() {
            "daily" | "all" => ALL_DAYS,
            "weekdays" => 0x1f,
            "weekends" => 0x60,
            _ => match part.split_once('-') {
                Some((a, b)) => {
                    let (a, b) = (parse_day(a)?, parse_day(b)?);
                    let mut mask = 0u8;
                    let mut d = a;
                    loop {
                        mask |= 1 << d;
                        if d == b {
                            break;
                        }
                        d = (d + 1) % 7;
                    }
                    mask
                }
                None => 1 << parse_day(part)?,
            },
        };
    }
    Ok(days)
}

fn parse_time(s: &str) -> Result<u16, String> {
    let bad = || format!("{s:?} is not a time (HH:MM, 00:00 to 24:00)");
    let (h, m) = s.split_once(':').ok_or_else(bad)?;
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if m >= 60 || h > 24 || (h == 24 && m != 0) || s.len() > 5 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

/// `2MiB`, `500KB`, `750000`, `1.5MB/s`: bytes per second, at least [`MIN_RATE`].
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let bad = || format!("{s:?} is not a rate (bytes per second, e.g. 2MiB, 500KB or 750000)");
    let t = s.trim().trim_end_matches("/s");
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let scale: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" | "k" => 1e3,
        "kib" => 1024.0,
        "mb" | "m" => 1e6,
        "mib" => 1024.0 * 1024.0,
        "gb" | "g" => 1e9,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(bad()),
    };
    let rate = n * scale;
    if !rate.is_finite() || rate < MIN_RATE as f64 || rate > 1e15 {
        return Err(format!("rate {s:?} is out of range (at least {MIN_RATE} bytes per second)"));
    }
    Ok(rate as u64)
}

/// A target's windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Windows(Vec<Window>);

/// Whether content may go to a target now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// Open, limited to this many bytes per second by the window, if at all.
    Open { rate: Option<u64> },
    /// Closed until this Unix millisecond (`None`: no window ever opens).
    Closed { opens_at: Option<i64> },
}

impl Windows {
    /// Parses every spec (none: always open).
    pub fn parse_all(specs: &[String]) -> Result<Self, String> {
        specs.iter().map(|s| Window::parse(s)).collect::<Result<Vec<_>, _>>().map(Self)
    }

    /// The windows as stored (one canonical spec per line; `None`: none). A line that no
    /// longer parses is skipped with a warning rather than closing the target for good.
    pub fn from_stored(text: Option<&str>) -> Self {
        Self(
            text.unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .filter_map(|l| Window::parse(l).map_err(|e| tracing::warn!("ignoring a stored send window: {e}")).ok())
                .collect(),
        )
    }

    /// The form stored and shown (`None` when there is no window).
    pub fn to_stored(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.specs().join("\n"))
    }

    /// Each window in canonical form.
    pub fn specs(&self) -> Vec<String> {
        self.0.iter().map(Window::to_string).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Open or closed at Unix millisecond `now`, in the server's local time.
    pub fn at(&self, now: i64) -> Gate {
        self.at_with(now, local_time)
    }

    /// [`Windows::at`] with `local` turning Unix seconds into (weekday from Monday,
    /// minute of the day).
    fn at_with(&self, now: i64, local: impl Fn(i64) -> (usize, u16)) -> Gate {
        if self.0.is_empty() {
            return Gate::Open { rate: None };
        }
        if let Some(rate) = self.open_rate(local(now.div_euclid(1000))) {
            return Gate::Open { rate };
        }
        // Minute by minute for a week and a day (DST changes included): the first
        // minute any window is open.
        let minute = now.div_euclid(60_000) * 60_000;
        let opens_at =
            (1..=8 * 24 * 60).map(|i| minute + i * 60_000).find(|t| self.open_rate(local(t / 1000)).is_some());
        Gate::Closed { opens_at }
    }

    /// `Some(rate)` when a window is open at (weekday, minute).
    fn open_rate(&self, (day, minute): (usize, u16)) -> Option<Option<u64>> {
        let open: Vec<Option<u64>> = self.0.iter().filter(|w| w.open_at(day, minute)).map(|w| w.rate).collect();
        if open.is_empty() {
            None
        } else if open.contains(&None) {
            Some(None)
        } else {
            Some(open.into_iter().flatten().max())
        }
    }
}

/// (Weekday from Monday, minute of the day) of Unix second `secs` in the local zone
/// (the server's `TZ`, else `/etc/localtime`).
#[allow(unsafe_code)]
fn local_time(secs: i64) -> (usize, u16) {
    let t = secs as libc::time_t;
    // SAFETY: `libc::tm` is plain data, valid when zeroed; `localtime_r` (reentrant)
    // writes only into `tm`, and both pointers are valid for the call. The server never
    // changes its environment while running, so the zone it reads does not race.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = !unsafe { libc::localtime_r(&t, &mut tm) }.is_null();
    if !ok {
        let day = (secs.div_euclid(86_400) + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
        return (day, (secs.rem_euclid(86_400) / 60) as u16);
    }
    (((tm.tm_wday + 6) % 7) as usize, (tm.tm_hour * 60 + tm.tm_min) as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(s: &str) -> Window {
        Window::parse(s).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn specs_parse_to_a_canonical_form() {
        for (given, canonical) in [
            ("daily 22:00-06:00", "daily 22:00-06:00"),
            ("mon-fri 09:00-17:30@2MiB", "mon,tue,wed,thu,fri 09:00-17:30@2097152"),
            ("sat,sun 00:00-00:00", "sat,sun 00:00-00:00"),
            ("fri-mon 20:00-24:00@500KB", "mon,fri,sat,sun 20:00-24:00@500000"),
            ("Monday,wed-thu 1:05-2:00@1.5MB/s", "mon,wed,thu 01:05-02:00@1500000"),
        ] {
            let parsed = w(given);
            assert_eq!(parsed.to_string(), canonical, "{given}");
            assert_eq!(w(canonical), parsed, "{canonical} parses back");
        }
        for bad in [
            "",
            "daily",
            "daily 22:00",
            "funday 10:00-11:00",
            "mon 25:00-26:00",
            "mon 10:60-11:00",
            "mon 10:00-11:00@fast",
            "mon 10:00-11:00@100",
            "mon 24:00-01:00",
            "mon 10:00-11:00 extra",
        ] {
            let e = Window::parse(bad).unwrap_err();
            assert!(e.contains("DAYS HH:MM-HH:MM"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_window_opens_on_its_days_and_may_wrap_midnight() {
        let night = w("mon-fri 22:00-06:00");
        // Monday 23:00 and Tuesday 05:59 are in; Monday 05:00 (Sunday's night) is not.
        assert!(night.open_at(0, 23 * 60));
        assert!(night.open_at(1, 5 * 60 + 59));
        assert!(!night.open_at(1, 6 * 60));
        assert!(!night.open_at(0, 5 * 60));
        // Friday night runs into Saturday morning; Saturday night does not open.
        assert!(night.open_at(5, 60));
        assert!(!night.open_at(5, 23 * 60));
        let day = w("sat 00:00-00:00");
        assert!(day.open_at(5, 0) && day.open_at(5, 1439) && !day.open_at(6, 0));
        let office = w("daily 09:00-17:00");
        assert!(office.open_at(3, 9 * 60) && !office.open_at(3, 17 * 60) && !office.open_at(3, 8 * 60 + 59));
    }

    /// A fixed zone for tests: UTC, 1970-01-05 (a Monday) as day 0.
    fn utc(secs: i64) -> (usize, u16) {
        ((secs.div_euclid(86_400) + 3).rem_euclid(7) as usize, (secs.rem_euclid(86_400) / 60) as u16)
    }

    const MONDAY: i64 = 4 * 86_400 * 1000; // 1970-01-05 00:00 UTC, in ms

    #[test]
    fn the_gate_says_when_the_next_window_opens_and_at_what_rate() {
        let ws = Windows::parse_all(&["mon-fri 22:00-06:00@1MB".into(), "sat,sun 10:00-12:00".into()]).unwrap();
        let h = |d: i64, hh: i64, mm: i64| MONDAY + ((d * 24 + hh) * 60 + mm) * 60_000;
        assert_eq!(ws.at_with(h(0, 23, 0), utc), Gate::Open { rate: Some(1_000_000) });
        assert_eq!(ws.at_with(h(0, 12, 0) + 30_000, utc), Gate::Closed { opens_at: Some(h(0, 22, 0)) });
        // Friday at noon: Friday 22:00; Saturday 07:00: Saturday 10:00, no rate.
        assert_eq!(ws.at_with(h(4, 12, 0), utc), Gate::Closed { opens_at: Some(h(4, 22, 0)) });
        assert_eq!(ws.at_with(h(5, 7, 0), utc), Gate::Closed { opens_at: Some(h(5, 10, 0)) });
        assert_eq!(ws.at_with(h(5, 11, 0), utc), Gate::Open { rate: None });
        // No windows: always open; overlapping windows: the highest rate, none beats all.
        assert_eq!(Windows::default().at_with(h(2, 3, 0), utc), Gate::Open { rate: None });
        let both = Windows::parse_all(&["daily 00:00-00:00@2MB".into(), "daily 00:00-00:00@3MB".into()]).unwrap();
        assert_eq!(both.at_with(h(1, 1, 0), utc), Gate::Open { rate: Some(3_000_000) });
        // Stored and read back.
        assert_eq!(Windows::from_stored(ws.to_stored().as_deref()), ws);
        assert_eq!(Windows::default().to_stored(), None);
    }

    #[test]
    fn rates_parse_with_units() {
        assert_eq!(parse_rate("2MiB"), Ok(2 << 20));
        assert_eq!(parse_rate("500KB"), Ok(500_000));
        assert_eq!(parse_rate("750000"), Ok(750_000));
        assert_eq!(parse_rate("1gib/s"), Ok(1 << 30));
        assert!(parse_rate("1000").is_err(), "below 1 KiB/s");
        assert!(parse_rate("-5MB").is_err());
        assert!(parse_rate("5 parsecs").is_err());
    }
}
