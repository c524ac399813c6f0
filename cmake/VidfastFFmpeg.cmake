# Finds FFmpeg's development libraries with pkg-config. Sets VIDFAST_WITH_FFMPEG and the imported target
# PkgConfig::VIDFAST_FFMPEG. The frame reader is built only when they are present; everything else builds anyway.
set(VIDFAST_WITH_FFMPEG OFF)
find_package(PkgConfig QUIET)
if(PKG_CONFIG_FOUND)
  pkg_check_modules(VIDFAST_FFMPEG QUIET IMPORTED_TARGET libavformat libavcodec libavutil libswscale)
endif()
if(VIDFAST_FFMPEG_FOUND)
  set(VIDFAST_WITH_FFMPEG ON)
else()
  message(WARNING "pyvidfast: FFmpeg development files not found (Debian: apt-get install libavformat-dev "
                  "libavcodec-dev libavutil-dev libswscale-dev pkg-config). The frame reader is not built; "
                  "every other op is.")
endif()
