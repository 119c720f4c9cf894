//! The VM, from configuration to exit, in the order a reader expects: `Vm::build` checks the
//! host and the inputs, then creates the VM, its memory, the in-kernel interrupt controllers, loads
//! the kernel, writes the boot structures, adds the devices and creates the vCPUs; `Vm::run`
//! starts one thread per vCPU and serves the event loop (console input, signals, the API) until
//! the VM ends.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::io::{AsRawFd, RawFd};
use std::os::unix::thread::JoinHandleExt;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use cove_devices::legacy::{
    AcpiPowerControl, BootTime, BootTimer, EventFdTrigger, ResetController, SerialPort,
};
use cove_devices::{Bus, BusDevice, BusError};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    MemoryRegionAddress,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::api::{ApiError, ApiServer, VmApi};
use crate::config::{CpuProfile, SerialConfig, VmConfig};
use crate::control::{ControlError, ExitReason, VmControl};
use crate::cpuid::{self, HostKind};
use crate::loader::{self, KernelImage, LoaderError};
use crate::seccomp::{self, ThreadKind};
use crate::serial_input::{SerialInput, SerialInputError};
use crate::terminal::{self, RawTerminal};
use crate::vcpu::{self, Vcpu};
use crate::virtio::VirtioDevices;
use crate::x86_64::acpi::{self, AcpiError, ACPI_POWER_PORT};
use crate::x86_64::boot::{self, BootError};
use crate::x86_64::layout::{
    self, ACPI_START, BOOT_TIMER_SIZE, BOOT_TIMER_START, KVM_TSS_START, MPTABLE_START,
};
use crate::x86_64::mptable::{self, MptableError};
use crate::x86_64::registers::{self, BootProtocol, RegistersError};

const COM1_PORT: u64 = 0x3f8;
const COM1_IRQ: u32 = 4;
const SERIAL_PORT_SIZE: u64 = 8;
const I8042_PORT: u64 = 0x60;
const I8042_PORT_SIZE: u64 = 5;
/// How long a pause waits for the vCPUs to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the VMM waits for vCPU threads to end before exiting without them.
const VCPU_JOIN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "cannot open /dev/kvm: {0}; load the kvm module and run as a user with access to /dev/kvm"
    )]
    OpenKvm(#[source] kvm_ioctls::Error),
    #[error("--cpus boot={asked}: this host allows at most {max} vCPUs per VM")]
    TooManyVcpus { asked: u32, max: u32 },
    #[error(transparent)]
    Loader(#[from] LoaderError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    SerialInput(#[from] SerialInputError),
    #[error("KVM refused to {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot reserve {size} bytes of guest memory")]
    Memory {
        size: u64,
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    #[error("cannot set up vCPU {index}")]
    Registers {
        index: u32,
        #[source]
        source: RegistersError,
    },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Mptable(#[from] MptableError),
    #[error("cannot write the MP table into guest memory")]
    WriteMptable(#[source] vm_memory::GuestMemoryError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("cannot write the ACPI tables into guest memory")]
    WriteAcpi(#[source] vm_memory::GuestMemoryError),
    #[error("cannot place a device")]
    Bus(#[from] BusError),
    #[error("cannot open the serial output file {path}: {source}")]
    SerialFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error(transparent)]
    Virtio(#[from] crate::virtio::VirtioSetupError),
    #[error("cannot create {what}: {source}")]
    Host {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_error(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn host_error(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Host { what, source }
}

/// Facts about the VM that the API reports.
struct Description {
    config: VmConfig,
    host: HostKind,
    profile: CpuProfile,
    hidden_features: Vec<&'static str>,
    protocol: BootProtocol,
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    boot_time: Arc<BootTime>,
    virtio: VirtioDevices,
}

/// A VM ready to run.
pub struct Vm {
    description: Arc<Description>,
    // Kept open for the VM's lifetime: the vCPUs and memory slots belong to it.
    _vm_fd: VmFd,
    vcpus: Vec<Vcpu>,
    control: Arc<VmControl>,
    serial: Option<Arc<Mutex<SerialPort>>>,
    api: Option<ApiServer>,
    serial_input: Option<SerialInput>,
    event_loop_filter: Option<seccompiler::BpfProgram>,
}

/// A device line that ends the VM (the i8042's reset, ACPI soft-off): records the exit on the
/// vCPU thread that pulled it, before that vCPU runs another guest instruction.
struct ExitTrigger {
    control: Arc<VmControl>,
    reason: ExitReason,
}

impl vm_superio::Trigger for ExitTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.control.request_exit(self.reason.clone());
        Ok(())
    }
}

impl Vm {
    /// Builds the VM that `config` describes; nothing runs yet. `started` is when the VMM
    /// process began, the zero of the boot timer.
    pub fn build(config: &VmConfig, started: Instant) -> Result<Self, VmError> {
        // Checks that need the host but create nothing.
        let host = HostKind::detect();
        let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
        let max_vcpus = (kvm.get_max_vcpus() as u32).min(mptable::MAX_VCPUS);
        if config.cpus.boot > max_vcpus {
            return Err(VmError::TooManyVcpus {
                asked: config.cpus.boot,
                max: max_vcpus,
            });
        }
        let kernel = KernelImage::open(&config.kernel.path)?;
        let mut initramfs = match &config.kernel.initramfs {
            Some(path) => Some((path, loader::open_initramfs(path)?)),
            None => None,
        };
        let serial_output: Option<Box<dyn Write + Send>> = match &config.serial {
            SerialConfig::Tty => Some(Box::new(std::io::stdout())),
            SerialConfig::File(path) => Some(Box::new(
                OpenOptions::new()
                    .create(true)
                    .write(true)
                    .truncate(true)
                    .open(path)
                    .map_err(|source| VmError::SerialFile {
                        path: path.clone(),
                        source,
                    })?,
            )),
            SerialConfig::Off => None,
        };
        let api = config
            .api_socket
            .as_deref()
            .map(ApiServer::bind)
            .transpose()?;
        let serial_input = config
            .serial_input
            .as_deref()
            .map(SerialInput::bind)
            .transpose()?;
        let mut virtio = VirtioDevices::open(config)?;
        let cmdline = virtio.announce(&config.kernel.cmdline)?;

        // The VM and its memory.
        let vm_fd = kvm.create_vm().map_err(kvm_error("create a VM"))?;
        let memory_size = config.memory.size.0;
        let memory = create_memory(&vm_fd, memory_size)?;
        vm_fd
            .set_tss_address(KVM_TSS_START as usize)
            .map_err(kvm_error("place the TSS"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_error("create the in-kernel IOAPIC and PIC"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd
            .create_pit2(pit)
            .map_err(kvm_error("create the in-kernel PIT"))?;

        // The kernel and what it reads at entry.
        let kernel = kernel.load(&memory)?;
        let initramfs = match &mut initramfs {
            Some((path, (file, size))) => Some(loader::load_initramfs(
                &memory,
                memory_size,
                kernel.end,
                path,
                file,
                *size,
            )?),
            None => None,
        };
        boot::write_cmdline(&memory, &cmdline)?;
        let table = mptable::build(config.cpus.boot)?;
        memory
            .write_slice(&table, GuestAddress(MPTABLE_START))
            .map_err(VmError::WriteMptable)?;
        let acpi = acpi::build(config.cpus.boot)?;
        memory
            .write_slice(&acpi.bytes, GuestAddress(ACPI_START))
            .map_err(VmError::WriteAcpi)?;
        match kernel.protocol {
            BootProtocol::Linux64 => boot::write_zero_page(
                &memory,
                memory_size,
                kernel.setup_header,
                cmdline.len(),
                initramfs,
                ACPI_START,
            )?,
            BootProtocol::Pvh => {
                boot::write_pvh_start_info(&memory, memory_size, initramfs, ACPI_START)?
            }
        }

        // Devices.
        let boot_time = Arc::new(BootTime::default());
        let control =
            Arc::new(VmControl::new(config.cpus.boot).map_err(host_error("the exit event"))?);
        let mut io_bus = Bus::new();
        let mut mmio_bus = Bus::new();
        let serial = match serial_output {
            Some(output) => {
                let interrupt =
                    EventFd::new(libc::EFD_NONBLOCK).map_err(host_error("the serial interrupt"))?;
                vm_fd
                    .register_irqfd(&interrupt, COM1_IRQ)
                    .map_err(kvm_error("wire the serial interrupt"))?;
                let port = Arc::new(Mutex::new(SerialPort::new(
                    EventFdTrigger::new(interrupt),
                    output,
                )));
                io_bus.insert(COM1_PORT, SERIAL_PORT_SIZE, port.clone())?;
                Some(port)
            }
            None => None,
        };
        let exit_trigger = |reason| ExitTrigger {
            control: control.clone(),
            reason,
        };
        io_bus.insert(
            I8042_PORT,
            I8042_PORT_SIZE,
            shared(ResetController::new(exit_trigger(ExitReason::GuestReset))),
        )?;
        io_bus.insert(
            u64::from(ACPI_POWER_PORT),
            1,
            shared(AcpiPowerControl::new(exit_trigger(
                ExitReason::GuestPowerOff,
            ))),
        )?;
        mmio_bus.insert(
            BOOT_TIMER_START,
            BOOT_TIMER_SIZE,
            shared(BootTimer::new(started, boot_time.clone())),
        )?;
        virtio.attach(&vm_fd, &memory, &mut mmio_bus)?;
        let io_bus = Arc::new(io_bus);
        let mmio_bus = Arc::new(mmio_bus);

        // vCPUs: the CPUID each sees, the state each starts in.
        let profile = cpuid::resolve_profile(config.cpus.profile, host);
        let hidden_features = cpuid::hidden_features(&config.cpus, host);
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_error("report its supported CPUID"))?;
        let vcpu_filter = seccomp::filter(ThreadKind::Vcpu, config.seccomp)?;
        let event_loop_filter = seccomp::filter(ThreadKind::EventLoop, config.seccomp)?;
        virtio.start_block_workers(seccomp::filter(ThreadKind::BlockWorker, config.seccomp)?)?;
        let mut vcpus = Vec::new();
        for index in 0..config.cpus.boot {
            let fd = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_error("create a vCPU"))?;
            let cpuid = cpuid::shape(&supported, index, config.cpus.boot, &hidden_features);
            fd.set_cpuid2(&cpuid)
                .map_err(kvm_error("set a vCPU's CPUID"))?;
            let registers_error = |source| VmError::Registers { index, source };
            registers::setup_common(&fd).map_err(registers_error)?;
            if index == 0 {
                registers::setup_boot_vcpu(&fd, &memory, kernel.protocol, kernel.entry)
                    .map_err(registers_error)?;
            }
            vcpus.push(Vcpu {
                index,
                host,
                fd,
                io_bus: io_bus.clone(),
                mmio_bus: mmio_bus.clone(),
                memory: memory.clone(),
                control: control.clone(),
                seccomp: vcpu_filter.clone(),
            });
        }

        let description = Arc::new(Description {
            config: config.clone(),
            host,
            profile,
            hidden_features,
            protocol: kernel.protocol,
            io_bus,
            mmio_bus,
            boot_time,
            virtio,
        });
        Ok(Self {
            description,
            _vm_fd: vm_fd,
            vcpus,
            control,
            serial,
            api,
            serial_input,
            event_loop_filter,
        })
    }

    /// Runs the VM until it ends and says why.
    pub fn run(self) -> Result<ExitReason, VmError> {
        // Blocked here, before any thread starts, so that only the signalfd sees them.
        let signals = terminal::stop_signals().map_err(host_error("the signal descriptor"))?;
        vcpu::install_kick_handler().map_err(|error| {
            host_error("the vCPU kick handler")(std::io::Error::from_raw_os_error(error.errno()))
        })?;
        seccomp::install_report_handler()?;
        let mut threads = Vec::new();
        for vcpu in self.vcpus {
            let thread = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || vcpu.run())
                .map_err(host_error("a vCPU thread"))?;
            threads.push(thread);
        }
        let terminal = match (&self.serial, &self.description.config.serial) {
            (Some(_), SerialConfig::Tty) => RawTerminal::enable(),
            _ => None,
        };
        let handle = VmHandle {
            control: self.control.clone(),
            threads: threads.iter().map(JoinHandle::as_pthread_t).collect(),
            description: self.description.clone(),
        };
        let controller = Controller {
            handle,
            signals,
            stdin: self
                .serial
                .as_ref()
                .filter(|_| matches!(self.description.config.serial, SerialConfig::Tty))
                .cloned(),
            api: self.api,
            serial_input: self.serial_input.zip(self.serial.clone()),
        };
        let mut events =
            EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().map_err(|error| {
                host_error("the event loop")(std::io::Error::other(format!("{error:?}")))
            })?;
        events.add_subscriber(Arc::new(Mutex::new(controller)));
        for server in self.description.virtio.subscribers()? {
            events.add_subscriber(Arc::new(Mutex::new(server)));
        }
        if let Err(error) = seccomp::apply(ThreadKind::EventLoop, &self.event_loop_filter) {
            self.control
                .request_exit(ExitReason::Failure(crate::describe_error(&error)));
        }
        while self.control.exit_reason().is_none() {
            if let Err(error) = events.run() {
                self.control.request_exit(ExitReason::Failure(format!(
                    "the event loop failed: {error:?}"
                )));
            }
        }
        stop_vcpus(&self.control, threads);
        self.description.virtio.remove_host_files();
        drop(terminal);
        crate::teardown::hand_over();
        Ok(self
            .control
            .exit_reason()
            .expect("the loop ends only once a reason is recorded"))
    }
}

fn shared(device: impl BusDevice + 'static) -> Arc<Mutex<dyn BusDevice>> {
    Arc::new(Mutex::new(device))
}

/// Reserves guest memory (nothing is touched until the guest touches it) and hands it to KVM.
fn create_memory(vm_fd: &VmFd, size: u64) -> Result<GuestMemoryMmap, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(size)
        .into_iter()
        .map(|(start, length)| (GuestAddress(start), length as usize))
        .collect();
    let memory =
        GuestMemoryMmap::from_ranges(&ranges).map_err(|source| VmError::Memory { size, source })?;
    for (slot, region) in memory.iter().enumerate() {
        let host_address = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| {
                host_error("a memory slot")(std::io::Error::other("region has no host mapping"))
            })?;
        let slot_description = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: host_address as u64,
        };
        // SAFETY: the region is a live mapping owned by `memory`, which outlives the VM's use of
        // it: the vCPUs hold clones of `memory` until their threads end.
        unsafe { vm_fd.set_user_memory_region(slot_description) }
            .map_err(kvm_error("map guest memory"))?;
    }
    Ok(memory)
}

/// Tells the vCPU threads to stop, kicks them out of the guest and waits a little for them.
fn stop_vcpus(control: &VmControl, threads: Vec<JoinHandle<()>>) {
    if let Some(reason) = control.exit_reason() {
        control.request_exit(reason);
    }
    for thread in &threads {
        kick(thread.as_pthread_t());
    }
    control.wait_until_vcpus_finished(VCPU_JOIN_TIMEOUT);
    for thread in threads.into_iter().filter(JoinHandle::is_finished) {
        let _ = thread.join();
    }
}

fn kick(thread: libc::pthread_t) {
    // SAFETY: the thread's JoinHandle is still held (not joined or detached), so its pthread_t
    // is valid even if the thread has ended; the signal has a handler installed.
    unsafe { libc::pthread_kill(thread, vcpu::kick_signal()) };
}

/// What the API acts on.
struct VmHandle {
    control: Arc<VmControl>,
    threads: Vec<libc::pthread_t>,
    description: Arc<Description>,
}

impl VmApi for VmHandle {
    fn info(&self) -> serde_json::Value {
        let description = &self.description;
        serde_json::json!({
            "state": self.control.state(),
            "config": description.config,
            "boot_time_us": description.boot_time.micros(),
            "vcpus": description.config.cpus.boot,
            "memory_bytes": description.config.memory.size.0,
            "boot_protocol": match description.protocol {
                BootProtocol::Linux64 => "linux-64bit",
                BootProtocol::Pvh => "pvh",
            },
            "host": description.host.name(),
            "cpu_profile": description.profile,
            "hidden_cpu_features": description.hidden_features,
            "unclaimed_port_reads": description.io_bus.unclaimed_reads(),
            "unclaimed_port_writes": description.io_bus.unclaimed_writes(),
            "unclaimed_mmio_reads": description.mmio_bus.unclaimed_reads(),
            "unclaimed_mmio_writes": description.mmio_bus.unclaimed_writes(),
            "virtio_devices": description.virtio.describe(),
        })
    }

    fn pause(&self) -> Result<(), ControlError> {
        self.control.begin_pause()?;
        for thread in &self.threads {
            kick(*thread);
        }
        self.control
            .wait_until_paused(PAUSE_TIMEOUT)
            .inspect_err(|_| {
                let _ = self.control.resume();
            })
    }

    fn resume(&self) -> Result<(), ControlError> {
        self.control.resume()
    }
}

/// The event loop's one subscriber: the exit event, stop signals, console input, API.
struct Controller {
    handle: VmHandle,
    signals: File,
    stdin: Option<Arc<Mutex<SerialPort>>>,
    api: Option<ApiServer>,
    serial_input: Option<(SerialInput, Arc<Mutex<SerialPort>>)>,
}

impl Controller {
    fn forward_input(&mut self, ops: &mut EventOps) {
        let Some(serial) = &self.stdin else { return };
        let mut buffer = [0u8; 64];
        match std::io::stdin().lock().read(&mut buffer) {
            Ok(0) | Err(_) => {
                let _ = ops.remove(Events::empty_raw(libc::STDIN_FILENO));
                self.stdin = None;
            }
            Ok(read) => {
                // Input beyond what the guest's receive FIFO holds is dropped, as a real UART
                // would overrun.
                let _ = cove_devices::bus::lock(serial).enqueue_input(&buffer[..read]);
            }
        }
    }
}

impl MutEventSubscriber for Controller {
    fn init(&mut self, ops: &mut EventOps) {
        let readable = |fd: RawFd| Events::new_raw(fd, EventSet::IN);
        let _ = ops.add(readable(self.handle.control.exit_event().as_raw_fd()));
        let _ = ops.add(readable(self.signals.as_raw_fd()));
        if self.stdin.is_some() && ops.add(readable(libc::STDIN_FILENO)).is_err() {
            // stdin is a file or /dev/null, which epoll cannot watch: no console input.
            self.stdin = None;
        }
        if let Some(api) = &self.api {
            let _ = ops.add(readable(api.listener_fd()));
        }
        if let Some((input, _)) = &self.serial_input {
            let _ = ops.add(readable(input.listener_fd()));
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.handle.control.exit_event().as_raw_fd() {
            let _ = self.handle.control.exit_event().read();
        } else if fd == self.signals.as_raw_fd() {
            if let Some(signal) = terminal::read_signal(&self.signals) {
                self.handle.control.request_exit(ExitReason::Signal(signal));
            }
        } else if fd == libc::STDIN_FILENO {
            self.forward_input(ops);
        } else if let Some((input, serial)) = self
            .serial_input
            .as_mut()
            .filter(|(input, _)| input.owns(fd))
        {
            input.handle(fd, ops, serial);
        } else if let Some(api) = self.api.as_mut().filter(|api| api.owns(fd)) {
            if api.handle(fd, ops, &self.handle) {
                self.handle.control.request_exit(ExitReason::ApiShutdown);
            }
        }
    }
}
