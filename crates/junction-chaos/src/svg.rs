//! The timeline: produces per second (acknowledged, and failed or indeterminate) with the
//! fault spans marked. Hand-written SVG; no plotting crate.

use std::fmt::Write as _;

use crate::history::{Attempt, FaultRecord};
use crate::schedule::FaultKind;

fn color(kind: FaultKind) -> &'static str {
    match kind {
        FaultKind::KillNode => "#d62728",
        FaultKind::KillPartitionLeader => "#ff7f0e",
        FaultKind::KillMetaLeader => "#8c564b",
        FaultKind::Pause => "#9467bd",
        FaultKind::Isolate => "#1f77b4",
        FaultKind::Split => "#17becf",
        FaultKind::OneWay => "#7f7f7f",
        FaultKind::Bridge => "#bcbd22",
        FaultKind::Latency => "#e377c2",
        FaultKind::Loss => "#aec7e8",
        FaultKind::RollingRestart => "#98df8a",
        FaultKind::ClusterRestart => "#000000",
        FaultKind::DiskFill => "#c49c94",
        FaultKind::BitFlip => "#ffbb78",
        FaultKind::ReplaceNode => "#2ca02c",
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Throughput per second (acknowledged, and failed or indeterminate) with fault spans.
pub fn timeline_svg(title: &str, attempts: &[Attempt], faults: &[FaultRecord]) -> String {
    let end_ms = attempts
        .iter()
        .map(|a| a.end_ms)
        .chain(faults.iter().map(|f| f.end_ms))
        .max()
        .unwrap_or(0);
    let secs = (end_ms / 1000 + 1) as usize;
    let mut ok = vec![0u64; secs];
    let mut bad = vec![0u64; secs];
    for a in attempts {
        let i = ((a.end_ms / 1000) as usize).min(secs - 1);
        if a.outcome.is_ok() {
            ok[i] += 1;
        } else {
            bad[i] += 1;
        }
    }
    let (w, h) = (1200.0_f64, 420.0_f64);
    let (left, right, top, bottom) = (60.0, 20.0, 40.0, 110.0);
    let (pw, ph) = (w - left - right, h - top - bottom);
    let ymax_raw = ok.iter().chain(&bad).copied().max().unwrap_or(1).max(1) as f64;
    let step = nice_step(ymax_raw / 5.0);
    let ymax = (ymax_raw / step).ceil() * step;
    let x = |ms: f64| left + pw * ms / (secs as f64 * 1000.0);
    let y = |v: f64| top + ph - ph * v / ymax;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(s, r#"<rect width="{w}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    for f in faults {
        let (x0, x1) = (
            x(f.start_ms as f64),
            x(f.end_ms.max(f.start_ms + 50) as f64),
        );
        let _ = writeln!(
            s,
            r#"<rect x="{x0:.1}" y="{top}" width="{:.1}" height="{ph}" fill="{}" fill-opacity="{}"><title>#{} {} t+{:.1}s..{:.1}s{}</title></rect>"#,
            (x1 - x0).max(1.0),
            color(f.kind),
            if f.skipped.is_some() { 0.05 } else { 0.22 },
            f.index,
            escape(&f.description),
            f.start_ms as f64 / 1000.0,
            f.end_ms as f64 / 1000.0,
            if f.skipped.is_some() {
                " (skipped)"
            } else {
                ""
            }
        );
        // Labels only while they fit; long runs rely on colours, the legend and the tooltips.
        if faults.len() <= 60 {
            let _ = writeln!(
                s,
                r#"<text transform="translate({:.1},{:.1}) rotate(-90)" font-size="9" text-anchor="end" fill="{}">{}</text>"#,
                x0 + 9.0,
                top + 4.0,
                color(f.kind),
                f.kind.name()
            );
        }
    }
    // Axes and ticks.
    let _ = writeln!(
        s,
        r##"<path d="M{left},{top} V{} H{}" stroke="#333" fill="none"/>"##,
        top + ph,
        left + pw
    );
    let mut v = 0.0;
    while v <= ymax + 0.5 {
        let yy = y(v);
        let _ = writeln!(
            s,
            r##"<line x1="{}" y1="{yy:.1}" x2="{left}" y2="{yy:.1}" stroke="#333"/><text x="{}" y="{:.1}" text-anchor="end">{v}</text>"##,
            left - 4.0,
            left - 6.0,
            yy + 4.0
        );
        v += step;
    }
    let tick = [1usize, 2, 5, 10, 15, 30, 60, 120, 300, 600, 1200]
        .into_iter()
        .find(|t| secs / t <= 15)
        .unwrap_or(1800);
    for t in (0..=secs).step_by(tick) {
        let xx = x(t as f64 * 1000.0);
        let _ = writeln!(
            s,
            r##"<line x1="{xx:.1}" y1="{}" x2="{xx:.1}" y2="{}" stroke="#333"/><text x="{xx:.1}" y="{}" text-anchor="middle">{t}s</text>"##,
            top + ph,
            top + ph + 4.0,
            top + ph + 16.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text transform="translate(14,{:.1}) rotate(-90)" text-anchor="middle">produces per second</text>"#,
        top + ph / 2.0
    );
    for (series, stroke) in [(&ok, "#2ca02c"), (&bad, "#d62728")] {
        let points: Vec<String> = series
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{:.1},{:.1}", x(i as f64 * 1000.0 + 500.0), y(*c as f64)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{stroke}" stroke-width="1.5"/>"#,
            points.join(" ")
        );
    }
    // Legend: the two series, then every fault kind that occurred.
    let ly = top + ph + 36.0;
    let mut lx = left;
    for (label, c) in [
        ("acknowledged/s", "#2ca02c"),
        ("failed or indeterminate/s", "#d62728"),
    ] {
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{c}" stroke-width="3"/><text x="{}" y="{}">{label}</text>"#,
            lx + 18.0,
            lx + 22.0,
            ly + 4.0
        );
        lx += 190.0;
    }
    let mut kinds: Vec<FaultKind> = faults.iter().map(|f| f.kind).collect();
    kinds.sort();
    kinds.dedup();
    let (mut kx, mut ky) = (left, ly + 22.0);
    for k in kinds {
        if kx > w - 170.0 {
            kx = left;
            ky += 18.0;
        }
        let _ = writeln!(
            s,
            r#"<rect x="{kx}" y="{}" width="14" height="10" fill="{}" fill-opacity="0.5"/><text x="{}" y="{}">{}</text>"#,
            ky - 8.0,
            color(k),
            kx + 18.0,
            ky + 1.0,
            k.name()
        );
        kx += 165.0;
    }
    s.push_str("</svg>\n");
    s
}

/// 1, 2 or 5 times a power of ten, at least `raw`.
fn nice_step(raw: f64) -> f64 {
    let raw = raw.max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{ack, kill_fault};

    #[test]
    fn svg_has_series_spans_and_legend() {
        let attempts = vec![ack(0, 10, 20), ack(1, 1500, 2100)];
        let svg = timeline_svg("seed <1>", &attempts, &[kill_fault()]);
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("kill-partition-leader"));
        assert!(svg.contains("seed &lt;1&gt;"));
        assert_eq!(svg.matches('<').count(), svg.matches('>').count());
    }

    #[test]
    fn nice_steps() {
        assert_eq!(nice_step(0.3), 1.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(12.0), 20.0);
        assert_eq!(nice_step(55.0), 100.0);
    }
}
