//! Architecture-specific parts: memory layout, boot set-up, firmware tables, vCPU registers.

// The aarch64 layout, FDT and PL011 are plain code: unit-tested on x86_64 hosts too.
#[cfg(any(target_arch = "aarch64", test))]
pub mod aarch64;
#[cfg(target_arch = "x86_64")]
pub mod x86_64;

#[cfg(target_arch = "aarch64")]
pub use self::aarch64 as current;
#[cfg(target_arch = "x86_64")]
pub use self::x86_64 as current;
