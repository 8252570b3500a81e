"""Guest images: assembly (comments, includes, errors with lines), flat binaries, ELF64."""

import struct

import pytest

from minivmm.errors import MinivmmError
from minivmm.guests import LOAD_ADDRESS
from minivmm.guests.assembler import assemble
from minivmm.guests.loader import find_guest, load_elf, load_guest, shipped_guests


def test_semicolon_comments_are_stripped_outside_strings(run_asm):
    result = run_asm('''
        lea rsi, [rip + msg]   ; a comment with mov eax, 1 in it
    # a whole-line comment
    l:  lodsb
        test al, al
        jz done
        out 0xe9, al
        jmp l
    done:
        xor eax, eax
        out 0xf4, al
    msg: .asciz "a;b\\n"
    ''')
    assert result.console == "a;b\n"


def test_assembler_error_names_the_line(asm_guest):
    path = asm_guest("nop\nmov eax, 1\nfrobnicate eax\nnop\n")
    with pytest.raises(MinivmmError, match=r":3: assembler error: .*frobnicate eax"):
        load_guest(path)


def test_missing_symbol_names_the_line(asm_guest):
    path = asm_guest("start:\n  nop\n  jmp start\n  jmp nowhere\n")
    with pytest.raises(MinivmmError, match=r":4: assembler error: .*jmp nowhere"):
        load_guest(path)


def test_forward_references_are_not_errors():
    assert assemble("jmp end\nnop\nend: hlt\n")


def test_include_errors_name_the_included_file(tmp_path):
    (tmp_path / "lib.inc").write_text("nop\nbadop\n")
    main = tmp_path / "main.asm"
    main.write_text("nop\n.include \"lib.inc\"\n")
    with pytest.raises(MinivmmError, match=r"lib.inc:2: assembler error"):
        load_guest(str(main))


def test_shipped_guests_resolve_by_name_with_or_without_extension():
    assert "hello.asm" in shipped_guests()
    assert find_guest("hello") == find_guest("hello.asm")
    image = load_guest("hello")
    assert image.entry == LOAD_ADDRESS and image.kind == "asm"


def test_flat_binary_loads_at_the_load_address(tmp_path):
    path = tmp_path / "guest.bin"
    path.write_bytes(assemble("mov al, 42\nout 0xf4, al\n"))
    from minivmm.vmm.vm import VM
    result = VM(str(path), "penryn").run(timeout=5)
    assert result.stop.reason == "exited" and result.stop.status == 42


def test_a_text_file_is_not_a_guest_but_machine_code_is_whatever_its_name(tmp_path):
    """Machine code loads as a flat binary with or without .bin; text is refused unless
    its name says it is a flat binary (code that reads as text: push 0x5a; pop rax)."""
    code = assemble("mov al, 42\nout 0xf4, al\n")
    for name, data in (("guest", code), ("guest.bin", code), ("ascii.bin", b"jZX")):
        (tmp_path / name).write_bytes(data)
        assert load_guest(str(tmp_path / name)).kind == "flat"
    for name, data in (("ascii", b"jZX"), ("notes", "café\tcrème\r\n\x1b[1mbold\x1b[0m\n".encode())):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MinivmmError, match=f"{name}: not a guest: a text file"):
            load_guest(str(tmp_path / name))


def elf64(segments, entry, e_type=2, machine=62):
    """A minimal static ELF64: header, program headers, then segment bodies."""
    phoff, phnum = 64, len(segments)
    offset = phoff + 56 * phnum
    header = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header += struct.pack("<HHIQQQIHHHHHH", e_type, machine, 1, entry, phoff, 0, 0, 64, 56, phnum, 0, 0, 0)
    phdrs, bodies = b"", b""
    for vaddr, body, memsz in segments:
        phdrs += struct.pack("<IIQQQQQQ", 1, 5, offset + len(bodies), vaddr, vaddr, len(body), memsz, 0x1000)
        bodies += body
    return header + phdrs + bodies


def test_elf_is_loaded_by_program_headers(tmp_path):
    code = assemble("mov rax, [0x300000]\nout 0xf4, al\n", address=0x200000)
    data = struct.pack("<Q", 7)
    image = elf64([(0x200000, code, len(code)), (0x300000, data, 0x1000)], entry=0x200000)
    path = tmp_path / "guest"
    path.write_bytes(image)
    from minivmm.vmm.vm import VM
    result = VM(str(path), "nehalem").run(timeout=5)
    assert result.stop.reason == "exited" and result.stop.status == 7


def test_gcc_built_static_elf_runs(tmp_path):
    import shutil
    import subprocess
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed: cannot build a freestanding C guest")
    src = tmp_path / "g.c"
    src.write_text("""
        static void outb(unsigned short p, unsigned char v) { __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(p)); }
        void _start(void) { const char *s = "C guest\\n"; while (*s) outb(0xe9, *s++); outb(0xf4, 3); for (;;) ; }
    """)
    exe = tmp_path / "g.elf"
    subprocess.run(["gcc", "-ffreestanding", "-nostdlib", "-static", "-no-pie", "-mno-red-zone", "-O1",
                    "-Wl,-Ttext-segment=0x400000", "-o", str(exe), str(src)], check=True)
    from minivmm.vmm.vm import VM
    result = VM(str(exe), "core2").run(timeout=5)
    assert result.console == "C guest\n" and result.stop.status == 3


@pytest.mark.parametrize("cut, message", [
    (10, "truncated ELF: 10 bytes"),
    (70, "truncated ELF: program headers end"),
    (64 + 56 + 3, "truncated ELF: segment 0"),
])
def test_truncated_elf_is_refused_with_the_reason(cut, message):
    image = elf64([(0x200000, b"\x90" * 16, 16)], entry=0x200000)
    with pytest.raises(MinivmmError, match=message):
        load_elf(image[:cut], "t.elf")


@pytest.mark.parametrize("kwargs, message", [
    ({"e_type": 3}, "not a static executable"),
    ({"machine": 3}, "not x86-64"),
])
def test_wrong_kind_of_elf_is_refused(kwargs, message):
    with pytest.raises(MinivmmError, match=message):
        load_elf(elf64([(0x200000, b"\x90", 1)], 0x200000, **kwargs), "t.elf")


def test_segment_in_vmm_area_or_beyond_ram_is_refused(tmp_path):
    from minivmm.vmm.vm import VM
    for vaddr, message in ((0x1000, "reserved area"), (0x2000000, "beyond guest RAM")):
        path = tmp_path / f"g{vaddr:x}"
        path.write_bytes(elf64([(vaddr, b"\xf4", 1)], vaddr))
        with pytest.raises(MinivmmError, match=message):
            VM(str(path), "nehalem")


def test_every_shipped_guest_says_what_it_demonstrates():
    from minivmm.guests.loader import shipped_guests_dir
    guests = shipped_guests_dir()
    sources = [guests.joinpath(n) for n in shipped_guests()] + \
        [p for p in guests.joinpath("c").iterdir() if p.name.endswith(".c") and p.name != "runtime.c"]
    for source in sources:
        lines = source.read_text().splitlines()
        header = [line for line in lines[:12] if line.startswith((";", "/*", " *"))]
        assert len(header) >= 2, f"{source.name}: needs a header paragraph saying what it demonstrates"
