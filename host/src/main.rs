// The batch pipeline allocates and frees many small strings per event; jemalloc keeps that
// cheap (glibc malloc took a quarter of the CPU time in profiles of the W1 benchmark).
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

// Return freed pages to the OS within a second, so that the memory of a large catch-up batch
// does not stay resident.
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    projection_host::cli::main()
}
