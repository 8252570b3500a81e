"""The Linux process personality: unmodified x86-64 Linux programs as guests.

A program starts as the kernel starts it (user mode, argv/envp/auxv on the stack, brk
after the image), its SYSCALLs exit to the system-call table here (Linux's register
convention and errno values), and its faults end it with the signal Linux would send.
Everything else (the CPUID view, the #UD gate, budgets, migration) is the VMM's, as for
every guest.
"""
