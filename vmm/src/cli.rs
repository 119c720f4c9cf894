//! The command line, in Cloud Hypervisor's style: `--kernel PATH --cpus boot=N --memory size=SIZE
//! ...`, or `--config FILE` with the same settings as JSON (flags given beside it override the
//! file). Parsing ends in a `VmConfig`; nothing past here sees the raw arguments.

use std::path::PathBuf;

use crate::config::{
    parse_size, ConfigError, CpuProfile, CpusConfig, DiskConfig, FeatureChange, KernelConfig,
    MemoryConfig, MemorySize, NetConfig, OptionError, OptionList, SerialConfig, VmConfig,
    VsockConfig,
};

pub const HELP: &str = "\
cove-vmm: run one KVM virtual machine

USAGE:
    cove-vmm --kernel PATH [--initramfs PATH] [--cmdline TEXT] [--cpus boot=N]
             [--memory size=SIZE] [--serial tty|file=PATH|off] [--serial-input PATH]
             [--api-socket PATH] [--disk path=FILE,...]... [--net tap=NAME|ip=ADDR,...]...
             [--vsock cid=N,socket=PATH] [--rng]
    cove-vmm --config FILE [flags that override the file]

FLAGS:
    --kernel PATH         kernel to boot: an ELF vmlinux (entered through its PVH note when it
                          has one, else at its 64-bit entry), a PVH ELF, or a bzImage
    --initramfs PATH      initramfs (or, for PVH guests, a module) loaded beside the kernel
    --cmdline TEXT        kernel command line (at most 2047 bytes)
    --cpus boot=N[,profile=auto|host|kvm-pvm]
                          number of vCPUs (default 1), one thread each, and the CPUID shape:
                          host passes through what KVM supports; kvm-pvm hides what a
                          software-virtualised (kvm-pvm) host cannot emulate in guest kernel
                          mode; auto (default) picks kvm-pvm on such a host, host elsewhere
    --cpu-features LIST   comma-separated changes applied after the profile: -NAME hides a
                          feature, +NAME shows one the profile hid (if KVM supports it).
                          NAMES: cx16 popcnt xsave avx avx2 fma f16c smap smep pcid invpcid
                          x2apic tsc-deadline rdrand rdseed aes pclmulqdq movbe sse4.1 sse4.2
                          ssse3 fsgsbase bmi1 bmi2 adx sha erms fsrm rdpid umip pku la57
                          avx512f xsaveopt xsavec xsaves rdtscp pdpe1gb topoext
    --memory size=SIZE    guest memory (default 128M): bytes, or with a K, M, G or T suffix;
                          above 3 GiB the memory continues at 4 GiB, leaving the 32-bit MMIO hole
    --serial MODE         COM1 (IRQ 4): tty (stdout and stdin, the default), file=PATH, or off
    --serial-input PATH   also type into COM1 what a client writes to this Unix socket
    --api-socket PATH     serve the HTTP API on this Unix socket:
                            GET /api/v1/vmm.ping       GET /api/v1/vm.info
                            PUT /api/v1/vm.pause       PUT /api/v1/vm.resume
                            PUT /api/v1/vm.shutdown
    --disk path=FILE[,readonly=on][,id=NAME][,direct=on]
                          a virtio-blk disk on a raw image file (repeatable); id is the
                          serial the guest reads (at most 20 bytes, default diskN); direct
                          bypasses the host's page cache
    --net tap=NAME[,mac=MAC]
    --net ip=ADDR[,mask=MASK][,tap=NAME][,mac=MAC]
                          a virtio-net interface (repeatable) on an existing tap, or on a
                          tap cove-vmm creates with the host address ADDR/MASK (default
                          mask 255.255.255.0) and removes at exit; the guest's MAC is MAC,
                          or a random locally administered one
    --vsock cid=N,socket=PATH
                          a virtio-vsock device: the guest's CID (3 or more) and the Unix
                          socket the host connects to; the host writes \"CONNECT PORT\\n\"
                          and reads \"OK HOSTPORT\\n\" before the stream to the guest's
                          port; a guest connection to host port P reaches the Unix socket
                          PATH_P
    --rng                 a virtio-rng device fed by the host's getrandom
    --seccomp on|log|off  per-thread system call filters (default on): a call outside a
                          thread's list ends cove-vmm with status 3; log only records it
    --config FILE         read the settings from a JSON file, shaped as GET /api/v1/vm.info's
                          \"config\": {\"kernel\": {\"path\", \"initramfs\", \"cmdline\"},
                          \"cpus\": {\"boot\", \"profile\", \"features\"}, \"memory\": {\"size\"},
                          \"serial\": \"tty\"|\"off\"|{\"file\": PATH}, \"api_socket\",
                          \"seccomp\", \"disks\": [{\"path\", \"readonly\", \"id\",
                          \"direct\"}], \"nets\": [{\"tap\", \"ip\", \"mask\", \"mac\"}],
                          \"vsock\": {\"cid\", \"socket\"}, \"rng\": true}; --disk and --net
                          flags replace the file's lists
    -h, --help            print this help
    -V, --version         print the version

DEVICES:
    COM1 16550 serial (0x3f8, IRQ 4); i8042 (0x60, 0x64: the guest's reset ends the VMM);
    boot timer at MMIO 0xc0000000 (a guest write of the byte 123 prints
    \"guest boot time: N us\" on stderr); in-kernel IOAPIC, LAPICs and PIT; an MP table.
    virtio-mmio (version 2) devices from 0xd0000000, 4 KiB apart, on IRQs 5 to 23, in the
    order disks, nets, vsock, rng; each is announced on the kernel command line as
    virtio_mmio.device=4K@0xBASE:IRQ.

EXIT STATUS:
    0  the guest reset or powered off, or the VM was stopped by the API, SIGTERM or SIGINT
    1  the configuration or the host was not usable; nothing was started
    2  the guest failed: a KVM internal error, a triple fault, or a vCPU that could not run
    3  cove-vmm made a system call its seccomp filter does not allow (a bug in cove-vmm)
";

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("unknown argument \"{0}\": see cove-vmm --help")]
    UnknownArgument(String),
    #[error("{0} needs a value: see cove-vmm --help")]
    MissingValue(String),
    #[error("--kernel is required (or a --config file with a kernel)")]
    NoKernel,
    #[error("invalid {flag} value \"{value}\": {reason}")]
    InvalidValue {
        flag: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot read the config file {path}: {source}")]
    ReadConfig {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the config file {path} is not a valid VM config: {source}")]
    ParseConfig {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    DeviceOption(OptionError),
    #[error("--rng takes no value")]
    RngValue,
}

impl From<OptionError> for CliError {
    fn from(error: OptionError) -> Self {
        Self::DeviceOption(error)
    }
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    Run(Box<VmConfig>),
    Help,
    Version,
}

#[derive(Default)]
struct Overrides {
    kernel: Option<PathBuf>,
    initramfs: Option<PathBuf>,
    cmdline: Option<String>,
    cpus: Option<String>,
    cpu_features: Option<String>,
    memory: Option<String>,
    serial: Option<String>,
    api_socket: Option<PathBuf>,
    serial_input: Option<PathBuf>,
    seccomp: Option<String>,
    config: Option<PathBuf>,
    disks: Vec<DiskConfig>,
    nets: Vec<NetConfig>,
    vsock: Option<VsockConfig>,
    rng: bool,
}

/// Parses the arguments (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(arguments: I) -> Result<Command, CliError> {
    let mut overrides = Overrides::default();
    let mut arguments = arguments.into_iter();
    while let Some(argument) = arguments.next() {
        let (flag, inline) = match argument.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => (flag.to_string(), Some(value.into())),
            _ => (argument.clone(), None),
        };
        let mut value = || -> Result<String, CliError> {
            inline
                .clone()
                .or_else(|| arguments.next())
                .ok_or_else(|| CliError::MissingValue(flag.clone()))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--kernel" => overrides.kernel = Some(value()?.into()),
            "--initramfs" => overrides.initramfs = Some(value()?.into()),
            "--cmdline" => overrides.cmdline = Some(value()?),
            "--cpus" => overrides.cpus = Some(value()?),
            "--cpu-features" => overrides.cpu_features = Some(value()?),
            "--memory" => overrides.memory = Some(value()?),
            "--serial" => overrides.serial = Some(value()?),
            "--api-socket" => overrides.api_socket = Some(value()?.into()),
            "--serial-input" => overrides.serial_input = Some(value()?.into()),
            "--seccomp" => overrides.seccomp = Some(value()?),
            "--config" => overrides.config = Some(value()?.into()),
            "--disk" => overrides
                .disks
                .push(OptionList::new("--disk", &value()?).disk()?),
            "--net" => overrides
                .nets
                .push(OptionList::new("--net", &value()?).net()?),
            "--vsock" => overrides.vsock = Some(OptionList::new("--vsock", &value()?).vsock()?),
            "--rng" if inline.is_some() => return Err(CliError::RngValue),
            "--rng" => overrides.rng = true,
            _ => return Err(CliError::UnknownArgument(argument)),
        }
    }
    let config = build(overrides)?;
    config.validate()?;
    Ok(Command::Run(Box::new(config)))
}

fn build(overrides: Overrides) -> Result<VmConfig, CliError> {
    let mut config = match &overrides.config {
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadConfig {
                path: path.clone(),
                source,
            })?;
            serde_json::from_str(&text).map_err(|source| CliError::ParseConfig {
                path: path.clone(),
                source,
            })?
        }
        None => VmConfig {
            kernel: KernelConfig {
                path: overrides.kernel.clone().ok_or(CliError::NoKernel)?,
                initramfs: None,
                cmdline: String::new(),
            },
            cpus: CpusConfig::default(),
            memory: MemoryConfig::default(),
            serial: SerialConfig::default(),
            api_socket: None,
            serial_input: None,
            seccomp: Default::default(),
            disks: Vec::new(),
            nets: Vec::new(),
            vsock: None,
            rng: false,
        },
    };
    if !overrides.disks.is_empty() {
        config.disks = overrides.disks;
    }
    if !overrides.nets.is_empty() {
        config.nets = overrides.nets;
    }
    if let Some(vsock) = overrides.vsock {
        config.vsock = Some(vsock);
    }
    config.rng |= overrides.rng;
    if let Some(path) = overrides.kernel {
        config.kernel.path = path;
    }
    if let Some(path) = overrides.initramfs {
        config.kernel.initramfs = Some(path);
    }
    if let Some(cmdline) = overrides.cmdline {
        config.kernel.cmdline = cmdline;
    }
    if let Some(cpus) = overrides.cpus {
        parse_cpus(&cpus, &mut config.cpus)?;
    }
    if let Some(features) = overrides.cpu_features {
        for change in features.split(',').filter(|change| !change.is_empty()) {
            config.cpus.features.push(change.parse::<FeatureChange>()?);
        }
    }
    if let Some(memory) = overrides.memory {
        config.memory.size = parse_memory(&memory)?;
    }
    if let Some(serial) = overrides.serial {
        config.serial = parse_serial(&serial)?;
    }
    if let Some(socket) = overrides.api_socket {
        config.api_socket = Some(socket);
    }
    if let Some(socket) = overrides.serial_input {
        config.serial_input = Some(socket);
    }
    if let Some(mode) = overrides.seccomp {
        config.seccomp = mode
            .parse()
            .map_err(|reason| invalid("--seccomp", &mode, reason))?;
    }
    Ok(config)
}

fn invalid(flag: &'static str, value: &str, reason: impl Into<String>) -> CliError {
    CliError::InvalidValue {
        flag,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// `boot=N[,profile=P]`; a bare number is taken as `boot=N`.
fn parse_cpus(text: &str, cpus: &mut CpusConfig) -> Result<(), CliError> {
    for part in text.split(',') {
        let (key, value) = part.split_once('=').unwrap_or(("boot", part));
        match key {
            "boot" => {
                cpus.boot = value
                    .parse()
                    .map_err(|_| ConfigError::VcpuCount(value.to_string()))?;
            }
            "profile" => {
                cpus.profile = value
                    .parse::<CpuProfile>()
                    .map_err(|reason| invalid("--cpus", text, reason))?;
            }
            _ => {
                return Err(invalid(
                    "--cpus",
                    text,
                    format!(
                        "unknown option \"{key}\": expected boot=N or profile=auto|host|kvm-pvm"
                    ),
                ))
            }
        }
    }
    Ok(())
}

/// `size=SIZE`, or a bare size.
fn parse_memory(text: &str) -> Result<MemorySize, CliError> {
    let value = text.strip_prefix("size=").unwrap_or(text);
    if value.is_empty() || value.contains(['=', ',']) {
        return Err(invalid(
            "--memory",
            text,
            "expected size=SIZE, such as size=512M",
        ));
    }
    Ok(MemorySize(parse_size(value)?))
}

fn parse_serial(text: &str) -> Result<SerialConfig, CliError> {
    match text {
        "tty" => Ok(SerialConfig::Tty),
        "off" => Ok(SerialConfig::Off),
        _ => match text.strip_prefix("file=") {
            Some(path) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
            _ => Err(invalid("--serial", text, "expected tty, off or file=PATH")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(arguments: &[&str]) -> Result<VmConfig, CliError> {
        match parse(arguments.iter().map(|argument| argument.to_string()))? {
            Command::Run(config) => Ok(*config),
            other => panic!("expected a run, got {other:?}"),
        }
    }

    #[test]
    fn flags_build_the_config() {
        let config = run(&[
            "--kernel",
            "/boot/vmlinux",
            "--initramfs=/i.cpio",
            "--cmdline",
            "console=ttyS0",
            "--cpus",
            "boot=4,profile=host",
            "--memory",
            "size=2G",
            "--serial",
            "file=/tmp/out",
            "--api-socket",
            "/tmp/api.sock",
            "--serial-input",
            "/tmp/console.sock",
            "--cpu-features",
            "-avx,+cx16",
        ])
        .unwrap();
        assert_eq!(config.kernel.path, PathBuf::from("/boot/vmlinux"));
        assert_eq!(config.kernel.initramfs, Some(PathBuf::from("/i.cpio")));
        assert_eq!(config.kernel.cmdline, "console=ttyS0");
        assert_eq!(config.cpus.boot, 4);
        assert_eq!(config.cpus.profile, CpuProfile::Host);
        assert_eq!(config.cpus.features.len(), 2);
        assert_eq!(config.memory.size, MemorySize(2 << 30));
        assert_eq!(config.serial, SerialConfig::File("/tmp/out".into()));
        assert_eq!(config.api_socket, Some(PathBuf::from("/tmp/api.sock")));
        assert_eq!(
            config.serial_input,
            Some(PathBuf::from("/tmp/console.sock"))
        );
    }

    #[test]
    fn bad_input_gets_a_message_naming_it() {
        let message = |arguments: &[&str]| run(arguments).unwrap_err().to_string();
        assert!(message(&[]).contains("--kernel is required"));
        assert!(
            message(&["--kernel", "k", "--memory", "12X"]).contains("invalid memory size \"12X\"")
        );
        assert!(message(&["--kernel", "k", "--memory", "size="]).contains("expected size=SIZE"));
        assert!(message(&["--kernel", "k", "--cpus", "boot=0"]).contains("at least one vCPU"));
        assert!(message(&["--kernel", "k", "--cpus", "boot=two"]).contains("invalid vCPU count"));
        assert!(message(&["--kernel", "k", "--cpus", "boot=1,sockets=2"])
            .contains("unknown option \"sockets\""));
        assert!(message(&["--kernel", "k", "--serial", "pty"])
            .contains("expected tty, off or file=PATH"));
        assert!(message(&[
            "--kernel",
            "k",
            "--serial",
            "off",
            "--serial-input",
            "/tmp/in.sock"
        ])
        .contains("serial input socket needs a serial port"));
        assert!(message(&["--kernel", "k", "--bogus"]).contains("unknown argument \"--bogus\""));
        assert!(message(&["--kernel"]).contains("--kernel needs a value"));
        assert!(message(&["--kernel", "k", "--cpu-features", "avx"]).contains("write +NAME"));
        assert!(message(&["--config", "/nonexistent.json"]).contains("cannot read the config file"));
    }

    #[test]
    fn device_flags_build_the_device_lists() {
        let config = run(&[
            "--kernel",
            "k",
            "--disk",
            "path=/a.img",
            "--disk=path=/b.img,readonly=on,id=data",
            "--net",
            "tap=tap0,mac=52:54:00:12:34:56",
            "--net",
            "ip=192.0.2.1,mask=255.255.255.0",
            "--vsock",
            "cid=3,socket=/tmp/v.sock",
            "--rng",
        ])
        .unwrap();
        assert_eq!(config.disks.len(), 2);
        assert!(config.disks[1].readonly);
        assert_eq!(config.disks[1].id.as_deref(), Some("data"));
        assert_eq!(config.nets.len(), 2);
        assert_eq!(config.nets[0].tap.as_deref(), Some("tap0"));
        assert_eq!(config.vsock.as_ref().map(|vsock| vsock.cid), Some(3));
        assert!(config.rng);
        assert_eq!(config.virtio_device_count(), 6);
    }

    #[test]
    fn bad_device_flags_are_refused_before_anything_starts() {
        let message = |arguments: &[&str]| {
            let mut all = vec!["--kernel", "k"];
            all.extend_from_slice(arguments);
            run(&all).unwrap_err().to_string()
        };
        assert!(message(&["--disk", "readonly=on"]).contains("path=FILE is required"));
        assert!(
            message(&["--disk", "path=/a,id=x", "--disk", "path=/b,id=x"])
                .contains("two disks have the id \"x\"")
        );
        assert!(message(&["--net", "tap=t0,mac=zz:00:00:00:00:00"]).contains("mac=zz"));
        assert!(message(&["--net", "mac=52:54:00:00:00:01"]).contains("needs tap=NAME"));
        assert!(message(&["--vsock", "cid=2,socket=/tmp/v"]).contains("cid 2 is reserved"));
        assert!(message(&["--vsock", "socket=/tmp/v"]).contains("both cid=N and socket=PATH"));
        assert!(message(&["--rng=on"]).contains("--rng takes no value"));
        let many: Vec<String> = (0..20)
            .map(|index| format!("--disk=path=/d{index}"))
            .collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(message(&many).contains("at most 19"));
    }

    #[test]
    fn flags_override_the_config_file() {
        let dir = std::env::temp_dir().join(format!("cove-cli-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vm.json");
        std::fs::write(
            &file,
            r#"{"kernel": {"path": "/k", "cmdline": "a"}, "cpus": {"boot": 2}}"#,
        )
        .unwrap();
        let config = run(&["--config", file.to_str().unwrap(), "--cmdline", "b"]).unwrap();
        assert_eq!(config.kernel.cmdline, "b");
        assert_eq!(config.cpus.boot, 2);
        std::fs::write(&file, "{not json").unwrap();
        let error = run(&["--config", file.to_str().unwrap()])
            .unwrap_err()
            .to_string();
        assert!(error.contains("is not a valid VM config"), "{error}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
