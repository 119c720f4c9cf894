//! coved: the cove supervisor daemon. Serves the LXD 1.0 API on `$COVE_DIR/unix.socket`
//! (`LXD_DIR=$COVE_DIR lxc list` reaches it) and runs each container under its own monitor.
//! Stopping coved (SIGTERM, SIGINT) leaves every container running; the next coved finds them.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use cove_supervisor::daemon::{Daemon, Settings};
use cove_supervisor::instances::dispatch::InstanceRuntimes;
use cove_supervisor::instances::library::LibraryRuntime;
use cove_supervisor::instances::runtime::Runtime;
use cove_supervisor::instances::vm::{self, VmRuntime, VmSettings};

const USAGE: &str = "usage: coved [--dir DIR] [--group GROUP] [--cgroup-parent NAME]
             [--max-image-size BYTES] [--runtime shim|library] [--shim PATH]
             [--default-network NAME|none]
             [--vmm PATH] [--vm-agent PATH] [--vm-kernel PATH] [--vm-ready-timeout SECONDS]

  --dir DIR              state, images, containers and the socket (default: $COVE_DIR, else
                         /var/lib/cove)
  --group GROUP          the socket's group (mode 0660; default: root's)
  --cgroup-parent NAME   every container's cgroup is NAME/<instance> (default: cove)
  --max-image-size BYTES the largest image or file upload accepted (default: 8GiB)
  --runtime shim         one cove-shim monitor process per container (the default); containers
                         outlive coved
  --runtime library      containers inside coved's process (development only: they die with it)
  --shim PATH            the cove-shim binary (default: beside coved, else on PATH)
  --default-network NAME the managed network made on the first start, which the default
                         profile's eth0 joins (default: covebr0; none: no network)
  --vmm PATH             the cove-vmm binary for VMs (default: beside coved, else on PATH)
  --vm-agent PATH        the static cove-agent put in every VM's disk (default: what
                         guest-agent/build makes in coved's target directory)
  --vm-kernel PATH       the guest kernel of every VM (default: the newest build of the host's
                         flavour in ${COVE_CACHE_DIR:-/var/cache/cove}/kernel)
  --vm-ready-timeout S   how long a VM's start waits for its agent (default: 600)";

struct Options {
    settings: Settings,
    runtime: String,
    shim: Option<PathBuf>,
    default_network: Option<String>,
    vmm: Option<PathBuf>,
    vm_agent: Option<PathBuf>,
    vm_kernel: Option<PathBuf>,
    vm_ready_timeout: Duration,
}

fn parse(arguments: &[String]) -> Result<Options, String> {
    let mut settings = Settings {
        directory: std::env::var_os("COVE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/var/lib/cove")),
        socket_group: None,
        cgroup_parent: "cove".into(),
        max_image_size: 8 << 30,
    };
    let mut runtime = "shim".to_string();
    let mut shim = None;
    let mut default_network = Some(cove_supervisor::networks::DEFAULT_NETWORK.to_string());
    let (mut vmm, mut vm_agent, mut vm_kernel) = (None, None, None);
    let mut vm_ready_timeout = Duration::from_secs(600);
    let mut iterator = arguments.iter();
    while let Some(argument) = iterator.next() {
        let mut value = || {
            iterator
                .next()
                .cloned()
                .ok_or_else(|| format!("{argument} needs a value"))
        };
        match argument.as_str() {
            "--dir" => settings.directory = PathBuf::from(value()?),
            "--group" => settings.socket_group = Some(value()?),
            "--cgroup-parent" => {
                let parent = value()?;
                if parent.is_empty() || parent.contains("..") || parent.starts_with('/') {
                    return Err(format!("invalid --cgroup-parent \"{parent}\""));
                }
                settings.cgroup_parent = parent;
            }
            "--max-image-size" => {
                let text = value()?;
                settings.max_image_size = cove_shim::config::parse_size("--max-image-size", &text)
                    .map_err(|error| error.to_string())?;
            }
            "--runtime" => {
                runtime = value()?;
                if runtime != "shim" && runtime != "library" {
                    return Err(format!(
                        "unknown runtime \"{runtime}\": use shim or library"
                    ));
                }
            }
            "--shim" => shim = Some(PathBuf::from(value()?)),
            "--default-network" => {
                let name = value()?;
                default_network = if name == "none" {
                    None
                } else {
                    cove_supervisor::networks::validate_name(&name)
                        .map_err(|error| error.to_string())?;
                    Some(name)
                };
            }
            "--vmm" => vmm = Some(PathBuf::from(value()?)),
            "--vm-agent" => vm_agent = Some(PathBuf::from(value()?)),
            "--vm-kernel" => vm_kernel = Some(PathBuf::from(value()?)),
            "--vm-ready-timeout" => {
                let text = value()?;
                let seconds: u64 = text
                    .parse()
                    .ok()
                    .filter(|seconds| *seconds > 0)
                    .ok_or_else(|| {
                        format!("invalid --vm-ready-timeout \"{text}\": give seconds")
                    })?;
                vm_ready_timeout = Duration::from_secs(seconds);
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument \"{other}\"")),
        }
    }
    if !settings.directory.is_absolute() {
        settings.directory = std::env::current_dir()
            .map_err(|error| format!("cannot read the current directory: {error}"))?
            .join(&settings.directory);
    }
    Ok(Options {
        settings,
        runtime,
        shim,
        default_network,
        vmm,
        vm_agent,
        vm_kernel,
        vm_ready_timeout,
    })
}

fn make_runtime(options: &Options) -> Result<Arc<dyn Runtime>, String> {
    // Each start names the instance's own directory on its pool; this is only the default.
    let host = cove_shim::Host {
        containers_directory: options.settings.containers(),
        cgroup_parent: options.settings.cgroup_parent.clone(),
    };
    let containers = match options.runtime.as_str() {
        "library" => Arc::new(LibraryRuntime::new(host)) as Arc<dyn Runtime>,
        _ => cove_supervisor::instances::shim::ShimRuntime::new(
            host,
            options.settings.run(),
            options.shim.clone(),
        )
        .map(|runtime| Arc::new(runtime) as Arc<dyn Runtime>)
        .map_err(|error| error.to_string())?,
    };
    let machines = VmRuntime::new(VmSettings {
        cove_directory: options.settings.directory.clone(),
        vmm: options
            .vmm
            .clone()
            .or_else(|| vm::find_beside_or_on_path("cove-vmm")),
        agent: options.vm_agent.clone().or_else(vm::find_static_agent),
        kernel: options.vm_kernel.clone(),
        ready_timeout: options.vm_ready_timeout,
    });
    Ok(Arc::new(InstanceRuntimes::new(
        containers,
        Arc::new(machines),
    )))
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut terminate), Ok(mut interrupt)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = terminate.recv() => {}
        _ = interrupt.recv() => {}
    }
}

fn main() -> ExitCode {
    let arguments: Vec<String> = std::env::args().skip(1).collect();
    let options = match parse(&arguments) {
        Ok(options) => options,
        Err(message) if message.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("coved: {message}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .max_blocking_threads(256)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("coved: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let instances = match make_runtime(&options) {
            Ok(instances) => instances,
            Err(message) => {
                eprintln!("coved: {message}");
                return ExitCode::FAILURE;
            }
        };
        let daemon = match Daemon::open(options.settings.clone(), instances) {
            Ok(daemon) => Arc::new(daemon),
            Err(error) => {
                eprintln!("coved: {error}");
                return ExitCode::FAILURE;
            }
        };
        let listener = match cove_supervisor::server::bind(&daemon) {
            Ok(listener) => listener,
            Err(error) => {
                eprintln!("coved: {error}");
                return ExitCode::FAILURE;
            }
        };
        eprintln!(
            "coved: listening on {} (pid {})",
            daemon.settings.socket().display(),
            std::process::id()
        );
        // Before instances start: their nics join the networks' bridges.
        daemon.start_networks(options.default_network.as_deref());
        let reconciling = daemon.clone();
        tokio::spawn(async move {
            if let Err(error) = reconciling.reconcile().await {
                reconciling.events.warn(
                    "cannot reconcile instances at start",
                    &[("error", &error.to_string())],
                );
            }
        });
        match cove_supervisor::server::serve(daemon, listener, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(error) => {
                eprintln!("coved: {error}");
                ExitCode::FAILURE
            }
        }
    })
}
