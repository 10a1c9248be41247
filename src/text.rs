//! Text layout shared by every command that prints for people: kubectl-style tables, ages and
//! spans, byte sizes. Pure, with no dependency on the rest of the crate.

/// Left-aligned columns separated by three spaces, as `kubectl get` prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| -> String {
        let n = cells.len();
        let mut s = String::new();
        for (i, c) in cells.into_iter().enumerate() {
            s.push_str(c);
            if i + 1 < n {
                let pad = widths[i] - c.chars().count() + 3;
                s.extend(std::iter::repeat_n(' ', pad));
            }
        }
        s.push('\n');
        s
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// kubectl-style age: `45s`, `12m`, `5h`, `3d`; `-` when unknown or in the future by over a minute.
pub fn age(since_s: Option<i64>, now_s: i64) -> String {
    let Some(t) = since_s else {
        return "-".into();
    };
    let d = now_s - t;
    if d < -60 {
        return "-".into();
    }
    let d = d.max(0);
    if d < 120 {
        format!("{d}s")
    } else if d < 120 * 60 {
        format!("{}m", d / 60)
    } else if d < 48 * 3600 {
        format!("{}h", d / 3600)
    } else {
        format!("{}d", d / 86400)
    }
}

/// A duration in seconds as `1m30s`, `45s`, `2h5m`.
pub fn span(secs: f64) -> String {
    let s = secs.max(0.0).round() as i64;
    match (s / 3600, (s % 3600) / 60, s % 60) {
        (0, 0, s) => format!("{s}s"),
        (0, m, 0) => format!("{m}m"),
        (0, m, s) => format!("{m}m{s}s"),
        (h, 0, _) => format!("{h}h"),
        (h, m, _) => format!("{h}h{m}m"),
    }
}

pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut x = b as f64;
    let mut u = 0;
    while x >= 1024.0 && u + 1 < UNITS.len() {
        x /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{x:.2} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let t = table(&["A", "LONGER"], &[vec!["wide cell".into(), "x".into()]]);
        assert_eq!(t, "A           LONGER\nwide cell   x\n");
    }

    #[test]
    fn spans_and_sizes_read_like_kubectl() {
        assert_eq!(span(90.0), "1m30s");
        assert_eq!(span(7500.0), "2h5m");
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.00 MiB");
        assert_eq!(age(None, 0), "-");
    }
}
