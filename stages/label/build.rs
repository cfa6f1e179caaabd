fn main() {
    temper_link::emit_libtorch_link_args();
}
