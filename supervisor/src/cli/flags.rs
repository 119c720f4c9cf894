//! The flag reader behind every subcommand of `cove`: a table of the flags a subcommand
//! takes, read into positionals, flag values and switches. `--flag value`, `--flag=value`,
//! `-f value`, switches, and `--` ending the flags; an unknown flag is refused by name.

use super::CliError;

/// One flag a subcommand takes: its names (the first is the key) and whether it has a value.
pub struct Flag {
    pub names: &'static [&'static str],
    pub value: bool,
}

pub const fn switch(names: &'static [&'static str]) -> Flag {
    Flag {
        names,
        value: false,
    }
}

pub const fn valued(names: &'static [&'static str]) -> Flag {
    Flag { names, value: true }
}

/// The arguments of one subcommand, sorted into positionals, flag values and switches.
#[derive(Debug, Default)]
pub struct Parsed {
    pub positionals: Vec<String>,
    pub values: Vec<(&'static str, String)>,
    pub switches: Vec<&'static str>,
    /// What followed `--` (or, for exec, the command after its name).
    pub rest: Vec<String>,
}

impl Parsed {
    pub fn has(&self, key: &str) -> bool {
        self.switches.contains(&key)
    }

    pub fn all(&self, key: &str) -> Vec<String> {
        self.values
            .iter()
            .filter(|(name, _)| *name == key)
            .map(|(_, value)| value.clone())
            .collect()
    }

    pub fn last(&self, key: &str) -> Option<String> {
        self.all(key).pop()
    }
}

pub fn usage(message: impl Into<String>) -> CliError {
    CliError::Usage(message.into())
}

/// Reads `arguments` against `flags`. With `command_after`, the positional after that many
/// positionals starts the rest (exec's command), as does `--`.
pub fn read_flags(
    arguments: &[String],
    flags: &[Flag],
    command_after: Option<usize>,
) -> Result<Parsed, CliError> {
    let mut parsed = Parsed::default();
    let mut index = 0;
    while index < arguments.len() {
        let argument = &arguments[index];
        index += 1;
        if argument == "--" {
            parsed.rest = arguments[index..].to_vec();
            return Ok(parsed);
        }
        if !argument.starts_with('-') || argument == "-" {
            if command_after.is_some_and(|count| parsed.positionals.len() >= count) {
                parsed.rest = arguments[index - 1..].to_vec();
                return Ok(parsed);
            }
            parsed.positionals.push(argument.clone());
            continue;
        }
        let (name, inline) = match argument.split_once('=') {
            Some((name, value)) if argument.starts_with("--") => (name, Some(value.to_string())),
            _ => (argument.as_str(), None),
        };
        let flag = flags
            .iter()
            .find(|flag| flag.names.contains(&name))
            .ok_or_else(|| usage(format!("unknown flag {name}")))?;
        let key = flag.names[0];
        if flag.value {
            let value = match inline {
                Some(value) => value,
                None => {
                    let value = arguments
                        .get(index)
                        .ok_or_else(|| usage(format!("{name} needs a value")))?;
                    index += 1;
                    value.clone()
                }
            };
            parsed.values.push((key, value));
        } else if inline.is_some() {
            return Err(usage(format!("{name} takes no value")));
        } else {
            parsed.switches.push(key);
        }
    }
    Ok(parsed)
}

pub fn exactly(parsed: &Parsed, count: usize, what: &str) -> Result<Vec<String>, CliError> {
    if parsed.positionals.len() != count || !parsed.rest.is_empty() {
        return Err(usage(format!("expected {what}")));
    }
    Ok(parsed.positionals.clone())
}

pub fn at_least_one(parsed: &Parsed, what: &str) -> Result<Vec<String>, CliError> {
    if parsed.positionals.is_empty() || !parsed.rest.is_empty() {
        return Err(usage(format!("expected {what}")));
    }
    Ok(parsed.positionals.clone())
}

pub fn key_value(text: &str, flag: &str) -> Result<(String, String), CliError> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(usage(format!("invalid {flag} \"{text}\": give KEY=VALUE"))),
    }
}

pub fn number<T: std::str::FromStr>(text: &str, flag: &str) -> Result<T, CliError> {
    text.parse()
        .map_err(|_| usage(format!("invalid {flag} \"{text}\": give a number")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(line: &str) -> Vec<String> {
        line.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn values_switches_and_the_rest() {
        let flags = [valued(&["--config", "-c"]), switch(&["--force", "-f"])];
        let parsed =
            read_flags(&strings("a -c x=1 --config=y=2 b -f -- -c z"), &flags, None).unwrap();
        assert_eq!(parsed.positionals, ["a", "b"]);
        assert_eq!(parsed.all("--config"), ["x=1", "y=2"]);
        assert!(parsed.has("--force"));
        assert_eq!(parsed.rest, ["-c", "z"]);
    }

    #[test]
    fn the_command_starts_after_enough_positionals() {
        let parsed = read_flags(&strings("web ls -l"), &[], Some(1)).unwrap();
        assert_eq!(parsed.positionals, ["web"]);
        assert_eq!(parsed.rest, ["ls", "-l"]);
    }

    #[test]
    fn refuses_unknown_flags_and_missing_values() {
        let flags = [valued(&["--config"]), switch(&["--force"])];
        for line in ["--bogus", "--config", "--force=yes"] {
            assert!(
                matches!(
                    read_flags(&strings(line), &flags, None),
                    Err(CliError::Usage(_))
                ),
                "{line}"
            );
        }
        assert!(key_value("novalue", "-c").is_err());
        assert!(number::<u32>("x", "--uid").is_err());
    }
}
