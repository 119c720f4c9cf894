//! How the CLI prints lists: `lxc`'s boxed tables, CSV (RFC 4180, no header, as `lxc list
//! -f csv`), and the column letters of `cove list -c`. JSON is serde_json's; YAML is
//! `super::yaml`'s. Sizes and dates are made readable here too.

use super::CliError;

/// `--format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Table,
    Json,
    Yaml,
    Csv,
}

impl Format {
    pub fn parse(text: &str) -> Result<Self, CliError> {
        match text {
            "table" => Ok(Self::Table),
            "json" => Ok(Self::Json),
            "yaml" => Ok(Self::Yaml),
            "csv" => Ok(Self::Csv),
            other => Err(CliError::Usage(format!(
                "invalid format \"{other}\": use table, json, yaml or csv"
            ))),
        }
    }
}

/// A column of `cove list`, named by `lxc`'s letters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Column {
    Name,
    State,
    Ipv4,
    Ipv6,
    Type,
    Snapshots,
    Pid,
    Profiles,
    Created,
    LastUsed,
    Processes,
    Memory,
    Architecture,
    Description,
}

impl Column {
    const ALL: [(char, Column, &'static str); 14] = [
        ('n', Column::Name, "NAME"),
        ('s', Column::State, "STATE"),
        ('4', Column::Ipv4, "IPV4"),
        ('6', Column::Ipv6, "IPV6"),
        ('t', Column::Type, "TYPE"),
        ('S', Column::Snapshots, "SNAPSHOTS"),
        ('p', Column::Pid, "PID"),
        ('P', Column::Profiles, "PROFILES"),
        ('c', Column::Created, "CREATED AT"),
        ('l', Column::LastUsed, "LAST USED AT"),
        ('N', Column::Processes, "PROCESSES"),
        ('m', Column::Memory, "MEMORY USAGE"),
        ('a', Column::Architecture, "ARCHITECTURE"),
        ('d', Column::Description, "DESCRIPTION"),
    ];

    /// `ns46tS` (commas allowed, as `lxc` takes them).
    pub fn parse_letters(letters: &str) -> Result<Vec<Self>, CliError> {
        let columns: Vec<Self> = letters
            .chars()
            .filter(|letter| *letter != ',')
            .map(|letter| {
                Self::ALL
                    .iter()
                    .find(|(known, _, _)| *known == letter)
                    .map(|(_, column, _)| *column)
                    .ok_or_else(|| {
                        CliError::Usage(format!(
                            "unknown column '{letter}': use letters of ns46tSpPclNmad"
                        ))
                    })
            })
            .collect::<Result<_, _>>()?;
        if columns.is_empty() {
            return Err(CliError::Usage("--columns names no column".into()));
        }
        Ok(columns)
    }

    pub fn header(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(_, column, _)| *column == self)
            .map(|(_, _, header)| *header)
            .unwrap_or_default()
    }
}

fn center(text: &str, width: usize) -> String {
    let length = text.chars().count();
    let left = (width - length.min(width)) / 2;
    let right = width - length.min(width) - left;
    format!("{}{text}{}", " ".repeat(left), " ".repeat(right))
}

/// A boxed table as `lxc list` draws it: headers centred, cells left-aligned, a cell with
/// several lines (several addresses) spread over as many rows.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers
        .iter()
        .map(|header| header.chars().count())
        .collect();
    for row in rows {
        for (index, cell) in row.iter().enumerate().take(widths.len()) {
            for line in cell.lines() {
                widths[index] = widths[index].max(line.chars().count());
            }
        }
    }
    let rule: String = widths
        .iter()
        .map(|width| format!("+{}", "-".repeat(width + 2)))
        .collect::<String>()
        + "+\n";
    let mut output = rule.clone();
    for (header, width) in headers.iter().zip(&widths) {
        output.push_str(&format!("| {} ", center(header, *width)));
    }
    output.push_str("|\n");
    output.push_str(&rule);
    for row in rows {
        let lines: Vec<Vec<&str>> = (0..widths.len())
            .map(|index| {
                row.get(index)
                    .map(|cell| cell.lines().collect())
                    .unwrap_or_default()
            })
            .collect();
        let height = lines.iter().map(Vec::len).max().unwrap_or(0).max(1);
        for line in 0..height {
            for (cell, width) in lines.iter().zip(&widths) {
                let text = cell.get(line).copied().unwrap_or("");
                let pad = width - text.chars().count().min(*width);
                output.push_str(&format!("| {text}{} ", " ".repeat(pad)));
            }
            output.push_str("|\n");
        }
        output.push_str(&rule);
    }
    output
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n', '\r']) || text.starts_with(' ') || text.ends_with(' ') {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}

/// RFC 4180 rows, no header (as `lxc list -f csv`).
pub fn csv(rows: &[Vec<String>]) -> String {
    rows.iter()
        .map(|row| {
            row.iter()
                .map(|cell| csv_field(cell))
                .collect::<Vec<_>>()
                .join(",")
                + "\n"
        })
        .collect()
}

/// Bytes in binary units, as `lxc info` shows memory: `1.50MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes}B")
    } else {
        format!("{value:.2}{}", UNITS[unit])
    }
}

/// An RFC 3339 time as `lxc` lists it: `2024/01/31 12:00 UTC`; anything else as it came.
pub fn date(text: &str) -> String {
    let valid = text.len() >= 16
        && text.is_char_boundary(16)
        && text.as_bytes()[4] == b'-'
        && text.as_bytes()[10] == b'T';
    if !valid || text.starts_with("0001-") {
        return text.to_string();
    }
    format!(
        "{}/{}/{} {} UTC",
        &text[0..4],
        &text[5..7],
        &text[8..10],
        &text[11..16]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_is_boxed_with_centred_headers() {
        let text = table(
            &["NAME", "STATE", "IPV4"],
            &[
                vec![
                    "web".into(),
                    "RUNNING".into(),
                    "10.0.0.2 (eth0)\n10.0.1.2 (eth1)".into(),
                ],
                vec!["database".into(), "STOPPED".into(), String::new()],
            ],
        );
        assert_eq!(
            text,
            "\
+----------+---------+-----------------+
|   NAME   |  STATE  |      IPV4       |
+----------+---------+-----------------+
| web      | RUNNING | 10.0.0.2 (eth0) |
|          |         | 10.0.1.2 (eth1) |
+----------+---------+-----------------+
| database | STOPPED |                 |
+----------+---------+-----------------+
"
        );
    }

    #[test]
    fn empty_table_has_its_headers() {
        assert_eq!(table(&["NAME"], &[]), "+------+\n| NAME |\n+------+\n");
    }

    #[test]
    fn csv_quotes_what_needs_it() {
        assert_eq!(
            csv(&[
                vec!["web".into(), "RUNNING".into(), "".into()],
                vec!["a,b".into(), "say \"hi\"".into(), "two\nlines".into()],
            ]),
            "web,RUNNING,\n\"a,b\",\"say \"\"hi\"\"\",\"two\nlines\"\n"
        );
    }

    #[test]
    fn columns_from_letters() {
        assert_eq!(
            Column::parse_letters("ns46tS").unwrap(),
            [
                Column::Name,
                Column::State,
                Column::Ipv4,
                Column::Ipv6,
                Column::Type,
                Column::Snapshots
            ]
        );
        assert_eq!(
            Column::parse_letters("n,p").unwrap(),
            [Column::Name, Column::Pid]
        );
        assert!(Column::parse_letters("x").is_err());
        assert!(Column::parse_letters("").is_err());
        assert_eq!(Column::Ipv4.header(), "IPV4");
    }

    #[test]
    fn sizes_and_dates_read_well() {
        assert_eq!(size(512), "512B");
        assert_eq!(size(1536), "1.50KiB");
        assert_eq!(size(3 << 20), "3.00MiB");
        assert_eq!(date("2024-01-31T12:34:56.123Z"), "2024/01/31 12:34 UTC");
        assert_eq!(date("0001-01-01T00:00:00Z"), "0001-01-01T00:00:00Z");
        assert_eq!(date("soon"), "soon");
    }
}
