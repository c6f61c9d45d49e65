//! Small bar charts drawn on the server as SVG shapes (no chart library, no script): events
//! counted per hour over the last day, each bar split into up to a few series.

use chrono::{DateTime, Utc};

pub const HOURS: usize = 24;
const WIDTH: u32 = 480;
const HEIGHT: u32 = 120;
const BAR: u32 = WIDTH / HOURS as u32;

/// One series of a chart: its name (in the legend) and the CSS class its bars are drawn with.
pub struct Series {
    pub name: &'static str,
    pub class: &'static str,
}

/// A rectangle of one series in one hour's bar.
pub struct Segment {
    pub x: u32,
    pub y: u32,
    pub width: u32,
    pub height: u32,
    pub class: &'static str,
    /// What a pointer or a screen reader gets for it.
    pub label: String,
}

pub struct Chart {
    pub id: &'static str,
    pub title: &'static str,
    pub width: u32,
    pub height: u32,
    pub segments: Vec<Segment>,
    pub legend: Vec<(&'static str, &'static str, u64)>,
    /// The same figures in words: the chart's text alternative.
    pub summary: String,
}

/// Counts `events` (time, series index) into the 24 hours before `now`, the last bar being
/// the current hour; events outside the day or of an unknown series are ignored.
pub fn hourly(
    id: &'static str,
    title: &'static str,
    now: DateTime<Utc>,
    series: &[Series],
    events: impl IntoIterator<Item = (DateTime<Utc>, usize)>,
) -> Chart {
    let mut counts = Counts::new(series.len());
    for (at, which) in events {
        counts.add((now - at).num_hours(), which, 1);
    }
    drawn(id, title, series, counts)
}

/// Events counted per hour and series, by how many whole hours before `now` they happened
/// (`(now - at).num_hours()`, so the bucket SQL in `store::console` can fill it in).
pub struct Counts(Vec<Vec<u64>>);

impl Counts {
    pub fn new(series: usize) -> Counts {
        Counts(vec![vec![0u64; series]; HOURS])
    }

    /// Adds `count` events `age` whole hours old to `which` series; other ages (older than
    /// a day, in the future) and unknown series are ignored.
    pub fn add(&mut self, age: i64, which: usize, count: u64) {
        if !(0..HOURS as i64).contains(&age) {
            return;
        }
        let hour = HOURS - 1 - age as usize;
        if let Some(slot) = self.0.get_mut(hour).and_then(|c| c.get_mut(which)) {
            *slot += count;
        }
    }
}

/// The chart of counts made by [`hourly`] or filled from the database's buckets.
pub fn drawn(id: &'static str, title: &'static str, series: &[Series], counts: Counts) -> Chart {
    let Counts(counts) = counts;
    let max = counts
        .iter()
        .map(|c| c.iter().sum::<u64>())
        .max()
        .unwrap_or(0)
        .max(1);
    let mut segments = Vec::new();
    for (hour, by_series) in counts.iter().enumerate() {
        let mut top = HEIGHT;
        let ago = HOURS - 1 - hour;
        for (which, count) in by_series.iter().enumerate() {
            if *count == 0 {
                continue;
            }
            let height = ((*count as f64 / max as f64) * f64::from(HEIGHT - 4)).ceil() as u32;
            let height = height.clamp(1, top);
            top -= height;
            let name = series.get(which).map_or("", |s| s.name);
            segments.push(Segment {
                x: hour as u32 * BAR + 1,
                y: top,
                width: BAR - 2,
                height,
                class: series.get(which).map_or("", |s| s.class),
                label: if ago == 0 {
                    format!("{count} {name} this hour")
                } else {
                    format!("{count} {name} {ago} h ago")
                },
            });
        }
    }
    let legend: Vec<(&'static str, &'static str, u64)> = series
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let total = counts.iter().filter_map(|c| c.get(i)).sum();
            (s.name, s.class, total)
        })
        .collect();
    let summary = format!(
        "Last 24 hours: {}.",
        legend
            .iter()
            .map(|(name, _, total)| format!("{total} {name}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Chart {
        id,
        title,
        width: WIDTH,
        height: HEIGHT,
        segments,
        legend,
        summary,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_land_in_their_hour_and_bars_scale_to_the_busiest() {
        let now = Utc::now();
        let series = [
            Series {
                name: "ok",
                class: "ok",
            },
            Series {
                name: "failed",
                class: "bad",
            },
        ];
        let hour = chrono::Duration::hours(1);
        let chart = hourly(
            "t",
            "T",
            now,
            &series,
            [
                (now, 0),
                (now, 0),
                (now, 1),
                (now - hour * 3, 0),
                (now - hour * 30, 0), // older than a day
                (now, 7),             // no such series
            ],
        );
        assert_eq!(chart.legend, vec![("ok", "ok", 3), ("failed", "bad", 1)]);
        assert_eq!(chart.segments.len(), 3);
        let last: Vec<&Segment> = chart
            .segments
            .iter()
            .filter(|s| s.x == (HOURS as u32 - 1) * BAR + 1)
            .collect();
        assert_eq!(last.len(), 2);
        // The busiest bar is the full height; stacked segments do not overlap.
        assert_eq!(last[0].y + last[0].height, HEIGHT);
        assert_eq!(last[1].y + last[1].height, last[0].y);
        assert!(chart.summary.contains("3 ok") && chart.summary.contains("1 failed"));
    }
}
