// The command loop shared by the host drivers of csrc headers (tests/*_host.cpp): one command per stdin line,
// its first word the command's name; handle(name, rest) answers it on stdout and returns false for an unknown
// name, which ends the driver with status 2.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <iostream>
#include <sstream>
#include <string>

inline uint32_t float_bits(float x) {
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
}

template <typename Handler>
int serve_commands(Handler handle) {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd.empty()) continue;
    if (!handle(cmd, in)) {
      std::fprintf(stderr, "unknown command %s\n", cmd.c_str());
      return 2;
    }
  }
  return 0;
}
