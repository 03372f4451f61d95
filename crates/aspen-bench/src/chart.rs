//! The PNG chart: ops/s of both systems per workload and concurrency, as paired horizontal
//! bars on a log axis (the workloads span three orders of magnitude). Fonts are rendered by
//! ab_glyph from a TTF file read at run time, so no system font library is needed; without
//! a font file the chart is drawn without text.

use std::path::Path;
use std::sync::OnceLock;

use plotters::prelude::*;
use plotters::style::{FontStyle, RGBColor, register_font};

use crate::report::Report;

/// Font files tried in order (Debian's fonts-dejavu-core first).
pub const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
const FONT_FAMILY: &str = "sans-serif";
const WIDTH: u32 = 1200;
const BAR_HEIGHT: u32 = 14;
const BAR_GAP: u32 = 2;
const GROUP_GAP: u32 = 10;
const TOP: u32 = 60;
const BOTTOM: u32 = 40;
const RIGHT: u32 = 120;
const LABELS_WIDTH: u32 = 250;
const ASPEN_COLOR: RGBColor = RGBColor(0x2a, 0x7a, 0xb9);
const ETCD_COLOR: RGBColor = RGBColor(0xe0, 0x8a, 0x1e);

/// Why the chart could not be drawn.
#[derive(Debug, thiserror::Error)]
#[error("cannot draw the chart: {0}")]
pub struct ChartError(String);

/// Loads the first font found in [`FONT_PATHS`] for the chart's text. Returns whether one
/// was loaded; the bytes live for the rest of the process, as plotters requires.
pub fn load_font() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        for path in FONT_PATHS {
            let Ok(bytes) = std::fs::read(path) else { continue };
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if register_font(FONT_FAMILY, FontStyle::Normal, bytes).is_ok() {
                return true;
            }
        }
        false
    })
}

/// A log10 axis from `10^low` to `10^high` mapped onto pixels `[left, right]`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogAxis {
    /// Exponent at the left edge.
    pub low: i32,
    /// Exponent at the right edge.
    pub high: i32,
    /// Pixel of the left edge.
    pub left: i32,
    /// Pixel of the right edge.
    pub right: i32,
}

impl LogAxis {
    /// The axis covering `values` (positive ones; a decade either side at least).
    pub fn covering(values: impl IntoIterator<Item = f64>, left: i32, right: i32) -> LogAxis {
        let (mut low, mut high) = (i32::MAX, i32::MIN);
        for value in values.into_iter().filter(|value| *value >= 1.0 && value.is_finite()) {
            low = low.min(value.log10().floor() as i32);
            high = high.max(value.log10().floor() as i32 + 1);
        }
        if low > high {
            (low, high) = (0, 1);
        }
        LogAxis { low, high, left, right }
    }

    /// The pixel of `value`, clamped to the axis.
    pub fn pixel(&self, value: f64) -> i32 {
        if value <= 0.0 || !value.is_finite() {
            return self.left;
        }
        let fraction = (value.log10() - f64::from(self.low)) / f64::from(self.high - self.low);
        let span = f64::from(self.right - self.left);
        self.left + (fraction.clamp(0.0, 1.0) * span).round() as i32
    }
}

fn draw_error<E: std::fmt::Debug>(error: E) -> ChartError {
    ChartError(format!("{error:?}"))
}

/// Human ops/s: 950, 1k, 12.3k -> 12k, 1.2M.
pub fn short_rate(value: f64) -> String {
    let text = match value {
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e4 => format!("{:.0}k", v / 1e3),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    };
    text.replace(".0k", "k").replace(".0M", "M")
}

/// Draws the report's comparisons to `path` (PNG), with text when `with_text`.
pub fn draw(report: &Report, path: &Path, with_text: bool) -> Result<(), ChartError> {
    let groups = report.rows.len().max(1) as u32;
    let height = TOP + BOTTOM + groups * (2 * BAR_HEIGHT + BAR_GAP + GROUP_GAP);
    let left = if with_text { LABELS_WIDTH } else { 10 };
    let values = report.rows.iter().flat_map(|row| [row.aspen.ops_per_sec, row.etcd.ops_per_sec]);
    let axis = LogAxis::covering(values, left as i32, (WIDTH - RIGHT) as i32);
    let root = BitMapBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE).map_err(draw_error)?;
    let text = |size: u32| (FONT_FAMILY, size).into_font();
    let bottom = (height - BOTTOM) as i32;
    for exponent in axis.low..=axis.high {
        let x = axis.pixel(10f64.powi(exponent));
        root.draw(&PathElement::new([(x, TOP as i32 - 6), (x, bottom)], RGBColor(0xcc, 0xcc, 0xcc)))
            .map_err(draw_error)?;
        if with_text {
            root.draw(&Text::new(short_rate(10f64.powi(exponent)), (x - 10, bottom + 6), text(13)))
                .map_err(draw_error)?;
        }
    }
    if with_text {
        let title = format!(
            "Aspen vs etcd {} (3 nodes each, same machine, fsync on): ops/s, log scale",
            report.environment.etcd_version
        );
        root.draw(&Text::new(title, (10, 12), text(17))).map_err(draw_error)?;
        root.draw(&Text::new("Aspen/etcd", ((WIDTH - RIGHT) as i32 + 35, 37), text(13))).map_err(draw_error)?;
        for (index, (name, color)) in [("Aspen", ASPEN_COLOR), ("etcd", ETCD_COLOR)].into_iter().enumerate() {
            let x = (WIDTH - RIGHT) as i32 - 190 + index as i32 * 80;
            root.draw(&Rectangle::new([(x, 38), (x + 14, 50)], color.filled())).map_err(draw_error)?;
            root.draw(&Text::new(name, (x + 18, 37), text(13))).map_err(draw_error)?;
        }
    }
    for (index, row) in report.rows.iter().enumerate() {
        let top = TOP as i32 + index as i32 * (2 * BAR_HEIGHT + BAR_GAP + GROUP_GAP) as i32;
        if with_text {
            let label = format!("{} x{}", row.workload.name(), row.clients);
            root.draw(&Text::new(label, (10, top + BAR_HEIGHT as i32 - 6), text(14))).map_err(draw_error)?;
        }
        for (bar, (value, color)) in
            [(row.aspen.ops_per_sec, ASPEN_COLOR), (row.etcd.ops_per_sec, ETCD_COLOR)].into_iter().enumerate()
        {
            let y = top + bar as i32 * (BAR_HEIGHT + BAR_GAP) as i32;
            let x = axis.pixel(value).max(axis.left + 1);
            root.draw(&Rectangle::new([(axis.left, y), (x, y + BAR_HEIGHT as i32)], color.filled()))
                .map_err(draw_error)?;
            if with_text {
                root.draw(&Text::new(short_rate(value), (x + 4, y + 1), text(12))).map_err(draw_error)?;
            }
        }
        if with_text && let Some(ratio) = row.ops_ratio {
            let label = format!("{ratio:.2}x");
            root.draw(&Text::new(label, ((WIDTH - RIGHT) as i32 + 60, top + BAR_HEIGHT as i32 - 6), text(13)))
                .map_err(draw_error)?;
        }
    }
    root.present().map_err(draw_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_axis_covers_whole_decades_and_clamps() {
        let axis = LogAxis::covering([450.0, 21_000.0, 0.0], 100, 400);
        assert_eq!((axis.low, axis.high), (2, 5));
        assert_eq!(axis.pixel(100.0), 100);
        assert_eq!(axis.pixel(1_000.0), 200);
        assert_eq!(axis.pixel(100_000.0), 400);
        assert_eq!(axis.pixel(10.0), 100, "below the axis clamps to the left edge");
        assert_eq!(axis.pixel(0.0), 100);
        assert_eq!(LogAxis::covering([], 0, 10), LogAxis { low: 0, high: 1, left: 0, right: 10 });
    }

    #[test]
    fn draws_a_png_without_a_font() {
        use crate::fsync::FsyncProbe;
        use crate::report::{Comparison, Environment, Settings};
        use crate::workload::{Measurement, Workload};

        let measured = |ops_per_sec| Measurement { ops_per_sec, ..Measurement::default() };
        let probe = FsyncProbe { fsyncs_per_sec: 500.0, latency: Default::default() };
        let report = Report {
            settings: Settings {
                secs_per_row: 1.0,
                warmup_secs: 0.2,
                rounds: 1,
                value_bytes: 256,
                key_space: 10,
                scan_keys: 100,
                hot_keys: 8,
                connections: 1,
            },
            environment: Environment {
                cpus: 2,
                kernel: "test".into(),
                etcd_version: "3.4".into(),
                data_dir: "/d".into(),
                load_average_before: "0.00 0.00 0.00".into(),
            },
            fsync_before: probe,
            fsync_after: None,
            fsyncs_per_sec: 500.0,
            rows: vec![
                Comparison::new(Workload::Put, 1, measured(450.0), measured(300.0), Some(500.0)),
                Comparison::new(Workload::Scan, 16, measured(7000.0), measured(0.0), None),
            ],
            skipped: Vec::new(),
            failover: Vec::new(),
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("chart.png");
        draw(&report, &path, false).expect("draws");
        let bytes = std::fs::read(&path).expect("written");
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    }

    #[test]
    fn rates_read_short() {
        let cases = [
            (950.0, "950"),
            (1000.0, "1k"),
            (1234.0, "1.2k"),
            (2_000_000.0, "2M"),
            (21_400.0, "21k"),
            (1_260_000.0, "1.3M"),
        ];
        for (value, expected) in cases {
            assert_eq!(short_rate(value), expected);
        }
    }
}
