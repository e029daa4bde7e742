//! `micromsg`: the MicroMsg command-line client ([`micromsg_client::cli`]).

fn main() -> std::process::ExitCode {
    // Before any thread starts: large messages would otherwise be faulted in afresh each time.
    micromsg_heap::keep_freed_heap();
    micromsg_client::cli::main()
}
