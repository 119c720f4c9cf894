//! The console: COM1, a 16550 UART at I/O port 0x3f8, shared by all processors.
//!
//! Every line is written whole under one spin lock, so lines printed by application
//! processors never interleave with each other or with the bootstrap processor's. The lock
//! is a plain integer atomic (`lock cmpxchg` on one byte); nothing here may use 16-byte
//! atomics, which the software hypervisor cannot emulate.
//!
//! Lines of the output contract are built with [`Console`]'s own `text`/`hex`/`decimal`
//! methods rather than `core::fmt`: where the hypervisor emulates guest kernel code
//! instruction by instruction, `core::fmt` costs most of a millisecond per line, and the
//! VMM measures the boot time. `println!` (`core::fmt`) is kept for error messages.

use crate::cpu;
use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

/// The transmit holding register of COM1.
const TRANSMIT_HOLDING: u16 = 0x3f8;

static CONSOLE_LOCK: AtomicBool = AtomicBool::new(false);

/// Exclusive access to COM1 for as long as it lives. The line-building methods take and
/// return it by value, so a whole line reads as one expression:
/// `Console::lock().text("modules: ").decimal(count).end_line()`.
pub struct Console {
    _private: (),
}

impl Console {
    /// Waits for and takes the console lock.
    pub fn lock() -> Self {
        while CONSOLE_LOCK
            .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
        Console { _private: () }
    }

    /// Takes the console even if another processor holds it, after a short wait. Only for the
    /// panic handler: the panicking processor may itself hold the lock, and a garbled line is
    /// better than a silent hang.
    pub fn lock_for_panic() -> Self {
        for _ in 0..1_000_000 {
            if CONSOLE_LOCK
                .compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                break;
            }
            core::hint::spin_loop();
        }
        CONSOLE_LOCK.store(true, Ordering::Relaxed);
        Console { _private: () }
    }

    /// Sends one byte without polling the line status register first. Virtual UARTs take a
    /// byte at any time, and each port access is a VM exit: polling would double the cost of
    /// every line.
    fn write_byte(&mut self, byte: u8) {
        cpu::write_port(TRANSMIT_HOLDING, byte);
    }

    /// Writes raw bytes, such as the command line, which need not be UTF-8.
    pub fn bytes(mut self, bytes: &[u8]) -> Self {
        for &byte in bytes {
            self.write_byte(byte);
        }
        self
    }

    pub fn text(self, text: &str) -> Self {
        self.bytes(text.as_bytes())
    }

    /// Writes `value` as `0x` and lowercase hexadecimal digits, without leading zeros.
    pub fn hex(self, value: u64) -> Self {
        let mut digits = [0u8; 16];
        let mut start = digits.len();
        let mut rest = value;
        loop {
            start -= 1;
            digits[start] = b"0123456789abcdef"[(rest & 0xf) as usize];
            rest >>= 4;
            if rest == 0 {
                break;
            }
        }
        self.text("0x").bytes(&digits[start..])
    }

    /// Writes `value` in decimal.
    pub fn decimal(self, value: u64) -> Self {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        let mut rest = value;
        loop {
            start -= 1;
            digits[start] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        self.bytes(&digits[start..])
    }

    /// Ends the line and releases the console.
    pub fn end_line(mut self) {
        self.write_byte(b'\n');
    }
}

impl Write for Console {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            self.write_byte(byte);
        }
        Ok(())
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        CONSOLE_LOCK.store(false, Ordering::Release);
    }
}

/// Prints one line (the arguments followed by `\n`) with `core::fmt`.
pub fn print_line(arguments: fmt::Arguments) {
    let mut console = Console::lock();
    // Writing to the UART cannot fail, and formatting errors come only from Display impls
    // that report them; there is nowhere better to report either.
    let _ = console.write_fmt(arguments);
    console.end_line();
}

/// Prints one line on COM1 with `core::fmt`, like `std::println!`. For error messages; see
/// the module documentation for the contract lines.
macro_rules! println {
    ($($argument:tt)*) => {
        $crate::serial::print_line(format_args!($($argument)*))
    };
}
pub(crate) use println;
