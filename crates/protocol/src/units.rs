//! Quantities as people read them, shared by the CLI, the client's messages and the
//! relay's status page, so one size reads the same everywhere.

/// `12 bytes`, `820 KB`, `1.5 MB`, `1.07 GB`: decimal units, as disks and networks count.
pub fn human_bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} bytes"),
        1_000..1_000_000 => format!("{:.0} KB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_as_people_say_them() {
        assert_eq!(human_bytes(12), "12 bytes");
        assert_eq!(human_bytes(820_400), "820 KB");
        assert_eq!(human_bytes(1_500_000), "1.5 MB");
        assert_eq!(human_bytes(1 << 30), "1.07 GB");
    }
}
