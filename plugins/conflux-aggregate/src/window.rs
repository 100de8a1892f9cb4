//! Which windows an event time falls in. Times are nanoseconds since the epoch.

use chrono::{Duration as ChronoDuration, NaiveTime, TimeZone, Timelike};
use chrono_tz::Tz;

use crate::config::Period;

/// Window assignment for every shape; sessions are grown by the stage.
#[derive(Debug, Clone)]
pub enum Windower {
    Tumbling {
        size: i64,
    },
    Hopping {
        size: i64,
        slide: i64,
    },
    /// Buckets of `every`; windows of `size` are merged from them.
    Sliding {
        size: i64,
        every: i64,
    },
    Session {
        gap: i64,
    },
    Cumulative {
        period: Period,
        tz: Tz,
    },
}

impl Windower {
    /// Appends the `(start, end)` windows containing `t`.
    pub fn assign(&self, t: i64, out: &mut Vec<(i64, i64)>) {
        out.clear();
        match *self {
            Windower::Tumbling { size } => {
                let start = t.div_euclid(size) * size;
                out.push((start, start + size));
            }
            Windower::Hopping { size, slide } => {
                let mut start = t.div_euclid(slide) * slide;
                while start > t - size {
                    out.push((start, start + size));
                    start -= slide;
                }
                out.reverse();
            }
            Windower::Sliding { every, .. } => {
                let start = t.div_euclid(every) * every;
                out.push((start, start + every));
            }
            Windower::Session { gap } => out.push((t, t + gap)),
            Windower::Cumulative { period, tz } => out.push(calendar_window(t, period, tz)),
        }
    }

    /// How long a window lasts (for rates); sessions and calendar days use their own bounds.
    pub fn is_sliding(&self) -> Option<(i64, i64)> {
        match *self {
            Windower::Sliding { size, every } => Some((size, every)),
            _ => None,
        }
    }
}

/// The calendar hour or day around `t` in a time zone, as UTC nanoseconds.
/// Days are 23 or 25 hours long on daylight-saving changes.
pub fn calendar_window(t: i64, period: Period, tz: Tz) -> (i64, i64) {
    let local = tz.timestamp_nanos(t);
    let naive = local.naive_local();
    let (start, end) = match period {
        Period::Day => {
            let day = naive.date();
            (day.and_time(NaiveTime::MIN), (day + ChronoDuration::days(1)).and_time(NaiveTime::MIN))
        }
        Period::Hour => {
            let hour = naive.date().and_time(NaiveTime::from_hms_opt(naive.hour(), 0, 0).unwrap_or(NaiveTime::MIN));
            (hour, hour + ChronoDuration::hours(1))
        }
    };
    let to_utc = |n: chrono::NaiveDateTime| {
        tz.from_local_datetime(&n)
            .earliest()
            .or_else(|| tz.from_local_datetime(&(n + ChronoDuration::hours(1))).earliest())
            .and_then(|d| d.timestamp_nanos_opt())
            .unwrap_or(t)
    };
    (to_utc(start), to_utc(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    #[test]
    fn tumbling_and_hopping() {
        let mut out = Vec::new();
        Windower::Tumbling { size: 60 * S }.assign(125 * S, &mut out);
        assert_eq!(out, vec![(120 * S, 180 * S)]);
        Windower::Tumbling { size: 60 * S }.assign(-1, &mut out);
        assert_eq!(out, vec![(-60 * S, 0)]);
        Windower::Hopping { size: 60 * S, slide: 20 * S }.assign(125 * S, &mut out);
        assert_eq!(out, vec![(80 * S, 140 * S), (100 * S, 160 * S), (120 * S, 180 * S)]);
    }

    #[test]
    fn calendar_days_follow_the_time_zone() {
        let tz: Tz = "Europe/Paris".parse().unwrap();
        // 2026-11-21T23:30:00Z is already the 22nd in Paris (UTC+1).
        let t = chrono::DateTime::parse_from_rfc3339("2026-11-21T23:30:00Z").unwrap().timestamp_nanos_opt().unwrap();
        let (start, end) = calendar_window(t, Period::Day, tz);
        let fmt = |n: i64| chrono::DateTime::from_timestamp_nanos(n).to_rfc3339();
        assert_eq!(fmt(start), "2026-11-21T23:00:00+00:00");
        assert_eq!(fmt(end), "2026-11-22T23:00:00+00:00");
        // The day daylight saving ends (2026-10-25) lasts 25 hours in Paris.
        let t = chrono::DateTime::parse_from_rfc3339("2026-10-25T12:00:00Z").unwrap().timestamp_nanos_opt().unwrap();
        let (start, end) = calendar_window(t, Period::Day, tz);
        assert_eq!((end - start) / (3600 * S), 25);
        let (start, end) = calendar_window(t, Period::Hour, tz);
        assert_eq!(end - start, 3600 * S);
        assert_eq!(fmt(start), "2026-10-25T12:00:00+00:00");
    }
}
