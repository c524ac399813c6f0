# Finds FFmpeg's development libraries with pkg-config, as VIDFAST_FFMPEG asks: AUTO (the frame reader is built
# where they are found, skipped with a message where not), ON (required), OFF (never built). Sets
# VIDFAST_WITH_FFMPEG and the imported target PkgConfig::VIDFAST_FFMPEG. Every other op builds either way.
set(VIDFAST_WITH_FFMPEG OFF)
if(NOT VIDFAST_FFMPEG STREQUAL "OFF")
  find_package(PkgConfig QUIET)
  if(PKG_CONFIG_FOUND)
    pkg_check_modules(VIDFAST_FFMPEG QUIET IMPORTED_TARGET libavformat libavcodec libavutil libswscale)
  endif()
  if(VIDFAST_FFMPEG_FOUND)
    set(VIDFAST_WITH_FFMPEG ON)
  else()
    set(_why "FFmpeg's development files (libavformat, libavcodec, libavutil, libswscale) were not found by "
             "pkg-config (Debian: apt-get install libavformat-dev libavcodec-dev libavutil-dev libswscale-dev "
             "pkg-config, or point PKG_CONFIG_PATH at FFmpeg's lib/pkgconfig)")
    string(CONCAT _why ${_why})
    if(VIDFAST_FFMPEG STREQUAL "ON")
      message(FATAL_ERROR "pyvidfast: VIDFAST_FFMPEG=ON but ${_why}.")
    endif()
    message(WARNING "pyvidfast: the frame reader (csrc/video_reader) is skipped: ${_why}. Every other op is built; "
                    "pyvidfast.io.VideoReader raises an error saying so.")
  endif()
else()
  message(STATUS "pyvidfast: the frame reader (csrc/video_reader) is skipped: VIDFAST_FFMPEG=OFF.")
endif()
