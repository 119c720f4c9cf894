//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`, which compiled Rust calls but which no
//! C library provides here.
//!
//! They are written in assembly with plain integer string instructions: written in Rust,
//! LLVM would recognise the loops and turn them back into calls to themselves, and the
//! versions in the prebuilt compiler-builtins are not available for this target.

core::arch::global_asm!(
    ".pushsection .text.memory_builtins, \"ax\", @progbits",
    //
    // void *memcpy(void *destination, const void *source, size_t length)
    ".global memcpy",
    ".type memcpy, @function",
    "memcpy:",
    "    movq %rdi, %rax",
    "    movq %rdx, %rcx",
    "    rep movsb",
    "    ret",
    //
    // void *memmove(void *destination, const void *source, size_t length): copies backwards
    // when the destination overlaps the end of the source.
    ".global memmove",
    ".type memmove, @function",
    "memmove:",
    "    movq %rdi, %rax",
    "    movq %rdx, %rcx",
    "    cmpq %rsi, %rdi",
    "    jbe 1f",
    "    leaq -1(%rsi,%rdx), %rsi",
    "    leaq -1(%rdi,%rdx), %rdi",
    "    std",
    "    rep movsb",
    "    cld",
    "    ret",
    "1:  rep movsb",
    "    ret",
    //
    // void *memset(void *destination, int byte, size_t length)
    ".global memset",
    ".type memset, @function",
    "memset:",
    "    movq %rdi, %r8",
    "    movl %esi, %eax",
    "    movq %rdx, %rcx",
    "    rep stosb",
    "    movq %r8, %rax",
    "    ret",
    //
    // int memcmp(const void *left, const void *right, size_t length), and bcmp, for which any
    // non-zero result will do.
    ".global memcmp",
    ".type memcmp, @function",
    ".global bcmp",
    ".type bcmp, @function",
    "memcmp:",
    "bcmp:",
    "    xorl %eax, %eax",
    "    testq %rdx, %rdx",
    "    jz 2f",
    "1:  movzbl (%rdi), %eax",
    "    movzbl (%rsi), %ecx",
    "    subl %ecx, %eax",
    "    jnz 2f",
    "    incq %rdi",
    "    incq %rsi",
    "    decq %rdx",
    "    jnz 1b",
    "2:  ret",
    ".popsection",
    options(att_syntax)
);
