"""Small guests: CPU-mode set-up, built-in programs, the dirtying workload, multiboot."""
