//! Line plots as inline SVG, drawn on the server (no script, no build).

use std::fmt::Write;

/// One named series of `(x, y)` points.
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

const W: f64 = 640.0;
const H: f64 = 180.0;
const PAD_L: f64 = 56.0;
const PAD_B: f64 = 22.0;
const COLORS: [&str; 6] = [
    "#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#57606a",
];

/// An SVG plot of `series` against seconds before now (`x` in seconds,
/// negative), with a title and the y unit. Empty series draw "no data".
pub fn svg(title: &str, unit: &str, series: &[Series]) -> String {
    let pts = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y1) = (0f64, 0f64, 0f64);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if x0 == x1 {
        x0 = x1 - 60.0;
    }
    let y1 = if y1 <= 0.0 { 1.0 } else { y1 * 1.1 };
    let sx = |x: f64| PAD_L + (x - x0) / (x1 - x0) * (W - PAD_L - 8.0);
    let sy = |y: f64| 8.0 + (1.0 - y / y1) * (H - PAD_B - 8.0);
    let mut o = String::new();
    let _ = write!(
        o,
        r##"<figure class="plot"><figcaption>{}</figcaption><svg role="img" aria-label="{}" viewBox="0 0 {W} {H}" width="{W}" height="{H}" xmlns="http://www.w3.org/2000/svg">"##,
        super::pages::esc(title),
        super::pages::esc(title)
    );
    let _ = write!(
        o,
        r##"<rect x="{PAD_L}" y="8" width="{}" height="{}" fill="#fff" stroke="#d0d7de"/>"##,
        W - PAD_L - 8.0,
        H - PAD_B - 8.0
    );
    for k in 0..=2 {
        let v = y1 * k as f64 / 2.0;
        let _ = write!(
            o,
            r##"<text x="{}" y="{}" font-size="10" text-anchor="end" fill="#57606a">{} {}</text>"##,
            PAD_L - 4.0,
            sy(v) + 3.0,
            short(v),
            super::pages::esc(unit)
        );
    }
    let _ = write!(
        o,
        r##"<text x="{PAD_L}" y="{}" font-size="10" fill="#57606a">{} min ago</text><text x="{}" y="{}" font-size="10" text-anchor="end" fill="#57606a">now</text>"##,
        H - 6.0,
        ((-x0) / 60.0).round(),
        W - 8.0,
        H - 6.0
    );
    let mut any = false;
    for (i, s) in series.iter().enumerate() {
        if s.points.len() < 2 {
            continue;
        }
        any = true;
        let c = COLORS[i % COLORS.len()];
        let path: Vec<String> = s
            .points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = write!(
            o,
            r##"<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{}"><title>{}</title></polyline>"##,
            path.join(" "),
            super::pages::esc(&s.name)
        );
        let _ = write!(
            o,
            r##"<text x="{}" y="{}" font-size="10" fill="{c}">{}</text>"##,
            PAD_L + 6.0,
            20.0 + 12.0 * i as f64,
            super::pages::esc(&s.name)
        );
    }
    if !any {
        let _ = write!(
            o,
            r##"<text x="{}" y="{}" font-size="12" text-anchor="middle" fill="#57606a">no data yet</text>"##,
            W / 2.0,
            H / 2.0
        );
    }
    o.push_str("</svg></figure>");
    o
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_lines_and_labels() {
        let s = svg(
            "Lag",
            "changes",
            &[Series {
                name: "parent/pull".into(),
                points: vec![(-120.0, 0.0), (-60.0, 50.0), (0.0, 10.0)],
            }],
        );
        assert!(s.contains("<polyline") && s.contains("parent/pull") && s.contains("2 min ago"));
        assert!(svg("Lag", "", &[]).contains("no data yet"));
    }
}
