# Offline stand-in for rules_cc: Debian's Bazel 4.2.3 asks for it even for pure C
# builds, and Debian's bazel-rules-cc is too new for it. Re-exports the native rules.
cc_binary = native.cc_binary
cc_import = native.cc_import
cc_library = native.cc_library
cc_proto_library = native.cc_proto_library
cc_test = native.cc_test
cc_toolchain = native.cc_toolchain
cc_toolchain_suite = native.cc_toolchain_suite
objc_library = native.objc_library
